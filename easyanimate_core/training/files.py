"""Writing training outputs so that a crash or a full disk never leaves a half-written file."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import EasyAnimateError


class SaveError(EasyAnimateError, OSError):
    """A training file could not be written; the previous file of that name is unchanged."""


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic(path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(path)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            cause = "the disk is full" if full else str(exc)
            raise SaveError(f"could not write {path}: {cause}. Nothing was half-written"
                            f"{' and the previous ' + path.name + ' is unchanged' if path.exists() else ''}; "
                            "free some space or choose another output folder.") from exc
        raise
    return path


def save_safetensors_atomic(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written under a temporary name in the same folder, then renamed over `path`."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return _atomic(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


def torch_save_atomic(path, obj) -> Path:
    """torch.save through a temporary name (optimizer state for resuming)."""
    return _atomic(path, lambda temp: torch.save(obj, temp))
