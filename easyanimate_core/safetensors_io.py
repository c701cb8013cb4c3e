"""Streaming safetensors reader: validates a file and reads its tensors one at a time.

`safetensors.safe_open` memory-maps the file, so every page it touches counts towards resident
memory on top of the copies we keep; reading each tensor straight into its final buffer keeps the
peak at one copy of the weights (plus one tensor while converting dtypes).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError
from .file_checks import check_file

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_READ_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read() call


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class SafetensorsIndex:
    """The parsed header of one safetensors file."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def read_index(path: str | os.PathLike) -> SafetensorsIndex:
    """Parse and validate a safetensors header; a truncated or foreign file raises CheckpointError."""
    path = Path(path)
    check_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is empty or truncated ({size} bytes): not a safetensors file. "
                                      "Download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path} is not a valid safetensors file (header length {header_len}, "
                                      f"file size {size}); it is probably truncated or corrupt. Download it again.")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}); download it again.") from exc

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from exc
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{info['dtype']}; the file is corrupt.")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, end - begin)
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {data_start + data_end:,} bytes but the file has "
            f"{size:,}. The download was probably interrupted; download the file again.")
    return SafetensorsIndex(path, entries, metadata)


def _read_into(f, entry: TensorEntry, out: torch.Tensor, path: Path) -> None:
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if entry.nbytes else memoryview(b"")
    f.seek(entry.start)
    done = 0
    while done < entry.nbytes:
        n = f.readinto(view[done:done + _READ_CHUNK])
        if not n:
            raise CheckpointError(f"{path}: unexpected end of file while reading {entry.name!r}; "
                                  "the file is truncated. Download it again.")
        done += n


def iter_tensors(index: SafetensorsIndex, names=None, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, converted to `dtype` (floating tensors only) and moved to `device`."""
    device = torch.device(device)
    wanted = index.entries.values() if names is None else (index.entries[n] for n in names)
    with open(index.path, "rb", buffering=0) as f:
        for entry in wanted:
            raw = torch.empty(entry.shape, dtype=entry.dtype)
            _read_into(f, entry, raw, index.path)
            target = dtype if (dtype is not None and raw.is_floating_point()) else raw.dtype
            tensor = raw.to(device=device, dtype=target)
            del raw
            yield entry.name, tensor


def load_file(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Read a whole safetensors file into a state dict, validating it first."""
    return dict(iter_tensors(read_index(path), dtype=dtype, device=device))
