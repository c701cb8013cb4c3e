"""Fetch an official EasyAnimate V5 model folder from the Hugging Face Hub with huggingface_hub.

Only the files the loader reads are fetched (no pickles, no README assets), one after the other into
`models/EasyAnimate/<name>/`. Resuming: a run after an interrupted one fetches only the files not yet
complete, and a connection dropped mid-file is resumed from where it broke (huggingface_hub asks for the
rest with a Range request); a file cut off by Cancel or a stopped process starts again from its beginning
(huggingface_hub >= 1.0 writes each attempt to a new temporary file). The total size is known (and
reported) before any byte is read. Progress goes to a callback, so the CLI prints a bar and the ComfyUI node drives its own.
`HF_ENDPOINT` (read by huggingface_hub) points everything at a mirror.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EasyAnimateError
from .loading import OFFICIAL_MODELS

HUB_ORGANISATION = "alibaba-pai"
# top-level entries of a model repository that the loader reads (see loading.EXPECTED_TREE)
NEEDED_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
NEEDED_FILES = ("model_index.json",)
# never fetched: pickled weights (never loaded, for safety) and other frameworks' formats
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx", ".gguf")
PARTIAL_MARKER = Path(".cache") / "huggingface"  # huggingface_hub's bookkeeping inside a local_dir download


class ModelDownloadError(EasyAnimateError, ConnectionError):
    """An official model could not be fetched (no network, hub unreachable, disk full…)."""


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report: bytes of the whole download done so far, of `total`, and the file being read."""

    done: int
    total: int
    file: str
    files_done: int
    files_total: int


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass
class DownloadPlan:
    """What downloading a model would fetch: the files, their sizes, and which are already complete."""

    name: str
    target: Path
    files: dict[str, int] = field(default_factory=dict)  # repository path -> size in bytes

    @property
    def repo_id(self) -> str:
        return f"{HUB_ORGANISATION}/{self.name}"

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def missing(self) -> dict[str, int]:
        """Files not yet on disk at their full size (partial files count as missing: they resume)."""
        return {path: size for path, size in self.files.items()
                if not ((self.target / path).is_file() and (self.target / path).stat().st_size == size)}

    def describe(self) -> str:
        missing = self.missing()
        left = sum(missing.values())
        already = f", {format_size(self.total_bytes - left)} already there" if left < self.total_bytes else ""
        return (f"downloading {self.repo_id} ({format_size(self.total_bytes)} in {len(self.files)} files{already}; "
                f"{format_size(left)} to fetch) into {self.target}")


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def official_name(spec: str | os.PathLike) -> str | None:
    """The official model a --model value or loader choice names, or None.

    Accepts 'EasyAnimateV5-7b-zh-InP', 'alibaba-pai/EasyAnimateV5-7b-zh-InP' and any path whose last part
    is an official name (models/EasyAnimate/EasyAnimateV5-12b-zh-InP).
    """
    text = str(spec).rstrip("/\\")
    if text.startswith(HUB_ORGANISATION + "/") and text.count("/") == 1:
        text = text.split("/", 1)[1]
    name = Path(text).name
    return name if name in OFFICIAL_MODELS else None


def manual_download_command(name: str, target: Path | str) -> str:
    """The command a user can run by hand to fetch the model `name` into `target`."""
    return f"hf download {HUB_ORGANISATION}/{name} --local-dir {target}"


def is_partial_download(folder: Path) -> bool:
    """A folder written by huggingface_hub's local-dir download (ours or `hf download`), complete or not."""
    return (folder / PARTIAL_MARKER).is_dir()


def _wanted(path: str) -> bool:
    if path.lower().endswith(SKIPPED_SUFFIXES):
        return False
    return path in NEEDED_FILES or path.split("/", 1)[0] in NEEDED_FOLDERS and "/" in path


def _unreachable(name: str, target: Path, exc: Exception) -> ModelDownloadError:
    return ModelDownloadError(
        f"could not download the EasyAnimate model {name} from the Hugging Face Hub ({type(exc).__name__}: {exc}).\n"
        f"Check the internet connection (or set HF_ENDPOINT to a mirror) and try again: the download resumes. "
        f"Or download it by hand, on a machine with internet, and copy the folder here:\n"
        f"  {manual_download_command(name, target)}")


def plan_download(name: str, target: Path | str, *, endpoint: str | None = None) -> DownloadPlan:
    """List the files of the official model `name` (one request to the hub) that the loader needs."""
    if name not in OFFICIAL_MODELS:
        raise ModelDownloadError(f"{name!r} is not an official EasyAnimate V5 model; official models: "
                                 f"{', '.join(OFFICIAL_MODELS)}")
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    plan = DownloadPlan(name, Path(target).absolute())
    try:
        for entry in HfApi(endpoint=endpoint).list_repo_tree(plan.repo_id, recursive=True):
            if isinstance(entry, RepoFile) and _wanted(entry.path):
                plan.files[entry.path] = int(entry.lfs.size if entry.lfs is not None else entry.size)
    except Exception as exc:  # any failure to list (offline, DNS, 5xx, proxy): the same advice
        raise _unreachable(name, plan.target, exc) from exc
    if not any(path.startswith("transformer/") for path in plan.files):
        raise ModelDownloadError(f"{plan.repo_id} on the hub lists no transformer files; the repository may have "
                                 f"changed. Download it by hand: {manual_download_command(name, plan.target)}")
    return plan


class _ByteCounter:
    """A stand-in for tqdm that huggingface_hub updates per chunk; forwards the running total to a callback."""

    def __init__(self, report: Callable[[int], None]):
        self.report = report

    def __call__(self, *args, initial: int = 0, **kwargs):  # huggingface_hub instantiates tqdm_class(...)
        if initial:
            self.report(initial)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.report(int(n or 0))

    def __getattr__(self, name):  # set_postfix_str, refresh, close…: nothing to show
        return lambda *args, **kwargs: None


def download_model(name: str, target: Path | str, *, progress: ProgressCallback | None = None,
                   announce: Callable[[str], None] | None = None, endpoint: str | None = None) -> Path:
    """Download (or resume) the official model `name` into `target`; returns `target`.

    `announce` gets one line with the total size before any byte is read; `progress` gets a
    DownloadProgress after every chunk. Raises ModelDownloadError with the manual command on failure.
    """
    from huggingface_hub import hf_hub_download

    target = Path(target).absolute()
    plan = plan_download(name, target, endpoint=endpoint)
    if announce is not None:
        announce(plan.describe())
    missing = plan.missing()
    done = plan.total_bytes - sum(missing.values())
    files_done = len(plan.files) - len(missing)
    takes_tqdm = "tqdm_class" in inspect.signature(hf_hub_download).parameters  # huggingface_hub >= 0.33
    stopped: list[BaseException] = []  # what the progress callback raised (Cancel): passed on unchanged
    for path, size in missing.items():
        start = done

        def report(n: int, path=path, start=start, size=size) -> None:
            nonlocal done
            done = min(done + n, start + size)
            if progress is not None:
                try:
                    progress(DownloadProgress(done, plan.total_bytes, path, files_done, len(plan.files)))
                except BaseException as exc:
                    stopped.append(exc)
                    raise

        extra = {"tqdm_class": _ByteCounter(report)} if takes_tqdm else {}
        try:
            hf_hub_download(plan.repo_id, path, local_dir=target, endpoint=endpoint, **extra)
        except Exception as exc:
            if stopped:
                raise stopped[0] from None
            raise _unreachable(name, target, exc) from exc
        done, files_done = start + size, files_done + 1
        if progress is not None:
            progress(DownloadProgress(done, plan.total_bytes, path, files_done, len(plan.files)))
    return target


def model_target(spec: str | os.PathLike, models_dir: Path | str) -> Path:
    """Where a --model value lives: a path as given, an official name (or alibaba-pai/name) under `models_dir`."""
    text = str(spec)
    name = official_name(text)
    if name is not None and (text == name or text.rstrip("/") == f"{HUB_ORGANISATION}/{name}"):
        return Path(models_dir) / name
    return Path(text).expanduser()


def ensure_model(spec: str | os.PathLike, models_dir: Path | str, *, progress: ProgressCallback | None = None,
                 announce: Callable[[str], None] | None = None, endpoint: str | None = None) -> Path:
    """The model folder `spec` names, downloading an official model first when it is absent.

    A folder that exists is used as is (the loader reports what is wrong with it), except an official
    one an interrupted download left incomplete, which is resumed. Anything that is not an official
    model name is returned unchanged, for the loader to validate.
    """
    from .errors import ModelFolderError
    from .loading import validate_model_dir

    target = model_target(spec, models_dir)
    name = official_name(target)
    if name is None:
        return target
    if target.is_dir():
        if not is_partial_download(target):
            return target
        try:
            validate_model_dir(target)
            return target
        except ModelFolderError:
            pass  # files missing: resume the download below
    return download_model(name, target, progress=progress, announce=announce, endpoint=endpoint)
