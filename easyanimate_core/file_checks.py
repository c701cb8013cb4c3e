"""Recognise model files that are not what their name says: git-lfs pointers, HTML pages, empty files.

A `git clone` without git-lfs leaves ~130-byte text pointers in place of every large file, and a
download that hit a login or error page saves that HTML under the file's name. Libraries reading
such a file fail with advice about something else (a missing package, a bad header), so every
file the loader reads is looked at here first, and the error says what the file really is.
"""
from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<!--", b"<?xml")
_SNIFF_BYTES = 512


def describe_damage(path: Path) -> str | None:
    """What is wrong with a file at first sight ('empty', 'a git-lfs pointer', 'an HTML page'), or None."""
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        return None  # the caller says it is missing
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head.startswith(_LFS_MAGIC):
        return "a git-lfs pointer (a small text stub standing in for the real file)"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(_HTML_STARTS):
        return "an HTML page (an error or login page saved in place of the file)"
    return None


def repair_hint(damage: str) -> str:
    """What to do about a damaged file."""
    if damage.startswith("a git-lfs pointer"):
        return ("The folder was cloned without git-lfs: run `git lfs install && git lfs pull` inside it, or "
                "download the folder with `hf download` instead.")
    return "Download this file (or the whole folder) again."


def check_file(path: Path, what: str = "") -> None:
    """Raise CheckpointError naming `path` when it is empty, a git-lfs pointer or an HTML page."""
    damage = describe_damage(path)
    if damage is not None:
        label = f" ({what})" if what else ""
        raise CheckpointError(f"{path}{label} is {damage}, not the real file. {repair_hint(damage)}")
