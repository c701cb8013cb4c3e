"""Block swap: the weights of the last N transformer blocks live in (pinned) CPU memory, not on the GPU.

    swap = enable_block_swap(pipe.transformer, 20, "cuda")   # the last 20 of 48 blocks
    ...                                                      # run as usual
    swap.remove()                                            # the model as before (same values,
                                                             # Parameter objects, dtypes, devices)

While a swapped block is idle, each of its parameters and buffers (weights, biases, norms, fp8
scales, LoRA factors: everything, generically) holds an empty placeholder of the same dtype; the
real values are kept outside the module tree, packed into one CPU byte buffer per block, pinned when
CUDA is available (one buffer, not one per tensor: the pinned-memory allocator rounds every
allocation up to a power of two, and one block is one DMA transfer). So `module.to(device)` and
ComfyUI's ModelPatcher move and count only the resident part (placeholders are 0 bytes).

During a forward, hooks on the blocks copy each swapped block into one of two device slots (byte
buffers the size of the largest swapped block; the block's tensors are views into it), one block
ahead of use: block i+1 is copied on a side CUDA stream while block i computes; an event makes the
compute stream wait for the copy, and the side stream waits for the compute stream before
overwriting a slot, so a slot is never refilled while the block that used it may still be running.
At most two swapped blocks are materialised at any time; the slots are freed when the transformer's
forward returns (into PyTorch's caching allocator). Nothing in transformer.py knows about it.

Why the *last* blocks: the first swapped block's copy then overlaps the resident block before it,
inside the same forward, so every copy is hidden behind compute and each forward starts from a clean
state. Swapping the first N would leave block 0's copy exposed at the start of every call (nothing
runs before it but the patch embedding), or need a prefetch carried over from the previous call.

Exception safety: the blocks' post-hooks and the transformer's post-hook run even when a forward
raises (`always_call`), and put every placeholder back; `reset()` does the same by hand and is
called by Pipeline.denoise on any exit, which covers KeyboardInterrupt (not an Exception, so hooks
with always_call do not see it). A stale state is also cleared at the start of the next forward.

LoRA: factors present when block swap is enabled are swapped with their block. To change LoRAs
afterwards use `Pipeline.set_loras` (or `with suspended(transformer): set_loras(...)`), which puts
the real (CPU) tensors back for the duration, so the LoRA code sees the real weight shapes, and then
swaps whatever the blocks hold afterwards. Removing LoRAs while swapped is tolerated (the vanished
factors are dropped); a tensor added to a swapped block without `suspended` stays resident.

On the CPU (no CUDA) the same mechanism runs with plain synchronous copies, so tests can check it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import EasyAnimateError, UnsupportedRequestError

_ATTR = "_easyanimate_block_swap"
_SLOTS = 2
_ALIGN = 256  # byte alignment of each tensor inside a packed block (enough for any dtype and for DMA)


@dataclass
class _Entry:
    """One parameter or buffer of a swapped block: where it lives in the packed buffer."""

    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    held: Tensor | None = None  # the placeholder (Parameter object or buffer) held before a copy was installed

    @property
    def current(self) -> Tensor | None:
        table = self.module._parameters if self.is_param else self.module._buffers
        value = table.get(self.name)
        return None if value is None else (value.data if self.is_param else value)

    def put(self, tensor: Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor

    def install(self, tensor: Tensor) -> None:
        """Put a slot copy in for one forward, keeping the placeholder in `held`. A parameter gets a fresh
        Parameter object around the copy (not `.data =`): autograd may have saved the object during a
        training forward, and it must keep seeing these values after `uninstall` (checkpointed backward)."""
        table = self.module._parameters if self.is_param else self.module._buffers
        self.held = table[self.name]
        table[self.name] = nn.Parameter(tensor, requires_grad=False) if self.is_param else tensor

    def uninstall(self) -> None:
        """The placeholder back (the module's own Parameter object)."""
        if self.held is not None and self.exists():
            table = self.module._parameters if self.is_param else self.module._buffers
            table[self.name] = self.held
        self.held = None

    def exists(self) -> bool:
        table = self.module._parameters if self.is_param else self.module._buffers
        return table.get(self.name) is not None

    def view(self, buffer: Tensor) -> Tensor:
        """This tensor inside a packed byte buffer (the CPU store or a device slot)."""
        return buffer[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class _Packed:
    """The tensors of one swapped block, packed into one CPU byte buffer."""

    buffer: Tensor
    entries: list[_Entry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


@dataclass
class _Load:
    """A swapped block copied into a slot (possibly still in flight on the side stream)."""

    slot: int
    entries: list[_Entry]
    tensors: list[Tensor]
    ready: torch.cuda.Event | None = None


class BlockSwap:
    """Block swap on one transformer; create it with `enable_block_swap`."""

    def __init__(self, transformer: nn.Module, num_blocks: int, device):
        blocks = getattr(transformer, "transformer_blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedRequestError("block swap needs a transformer with a `transformer_blocks` ModuleList")
        if not 1 <= int(num_blocks) <= len(blocks):
            raise UnsupportedRequestError(
                f"block swap: num_blocks must be between 1 and {len(blocks)} (the model's blocks), got {num_blocks}")
        self.transformer = transformer
        self.blocks = blocks
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.indices: tuple[int, ...] = tuple(range(len(blocks) - int(num_blocks), len(blocks)))
        self._packed: dict[int, _Packed] = {}
        self._loads: dict[int, _Load] = {}
        self._slots: list[Tensor | None] = [None] * _SLOTS
        self._suspend_depth = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._handles: list = []
        try:
            for index in self.indices:
                self._swap_out(index)
        except BaseException:
            self._restore_all()
            raise
        self._install_hooks()
        transformer.__dict__[_ATTR] = self

    # ------------------------------------------------------------------ public
    @property
    def num_blocks(self) -> int:
        return len(self.indices)

    @property
    def swapped_bytes(self) -> int:
        """Bytes of the swapped blocks' tensors kept off the module (in CPU memory), without alignment padding."""
        return sum(e.nbytes for p in self._packed.values() for e in p.entries if e.exists())

    @property
    def materialised(self) -> tuple[int, ...]:
        """Indices of the swapped blocks whose copies exist right now (at most 2; none between forwards)."""
        return tuple(sorted(self._loads))

    def reset(self) -> None:
        """Put every placeholder back and free the slots (idempotent; safe after an interrupted forward)."""
        for stream in self._streams.values():
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        for index in list(self._loads):
            self._release(index)
        self._slots = [None] * _SLOTS

    def remove(self) -> None:
        """Turn block swap off: the real tensors go back into the blocks, on the device each placeholder is on."""
        if self.transformer.__dict__.get(_ATTR) is not self:
            return
        self.reset()
        for stream in self._streams.values():
            stream.synchronize()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._restore_all()
        self._streams.clear()
        del self.transformer.__dict__[_ATTR]

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Inside the `with` body the swapped blocks hold their real tensors (CPU views of the store);
        afterwards whatever they hold (new LoRA factors included) is swapped out again. Re-entrant: an
        inner suspension inside an outer one changes nothing."""
        if self._suspend_depth:
            yield
            return
        self._suspend_depth += 1
        try:
            with self._suspended_once():
                yield
        finally:
            self._suspend_depth -= 1

    @contextmanager
    def _suspended_once(self) -> Iterator[None]:
        self.reset()
        resident: dict[int, torch.device | None] = {}
        for index, packed in self._packed.items():
            resident[index] = None
            for e in packed.entries:
                if e.exists():
                    resident[index] = resident[index] or e.current.device
                    e.put(e.view(packed.buffer))
        try:
            yield
        finally:
            for index in self.indices:
                self._swap_out(index, resident.get(index), previous=self._packed.pop(index, None))

    # ------------------------------------------------------------------ swapping out / back in
    def _tensors_of(self, index: int) -> list[tuple[nn.Module, str, bool, Tensor]]:
        found = []
        for module in self.blocks[index].modules():
            for name, param in module._parameters.items():
                if param is not None:
                    found.append((module, name, True, param.data))
            for name, buf in module._buffers.items():
                if buf is not None:
                    found.append((module, name, False, buf))
        return found

    def _swap_out(self, index: int, resident: torch.device | None = None,
                  previous: _Packed | None = None) -> None:
        """Pack every tensor of block `index` into a CPU buffer and leave empty placeholders behind.

        Placeholders go on `resident` (the device the block's placeholders were on before `suspended`),
        else on the device each tensor is on now. A block still holding exactly the views of its
        `previous` buffer keeps that buffer (no copy).
        """
        found = self._tensors_of(index)
        packed = previous if previous is not None and _unchanged(found, previous) else None
        if packed is None:
            entries, offset = [], 0
            for module, name, is_param, t in found:
                nbytes = t.numel() * t.element_size()
                entries.append(_Entry(module, name, is_param, offset, nbytes, t.dtype, tuple(t.shape)))
                offset += -(-nbytes // _ALIGN) * _ALIGN
            with torch.inference_mode(False), torch.no_grad():
                buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=self.pin)
                for e, (_, _, _, t) in zip(entries, found):
                    e.view(buffer).copy_(t)
            packed = _Packed(buffer, entries)
        self._packed[index] = packed
        with torch.inference_mode(False):
            for e, (_, _, _, t) in zip(packed.entries, found):
                e.put(torch.empty(0, dtype=t.dtype, device=resident or t.device))

    def _restore_all(self) -> None:
        """Real tensors back into the blocks (fresh pageable copies), block by block."""
        with torch.inference_mode(False), torch.no_grad():
            for index in list(self._packed):
                packed = self._packed.pop(index)
                for e in packed.entries:
                    if e.exists() and e.current.numel() == 0:
                        e.put(torch.empty(e.shape, dtype=e.dtype, device=e.current.device).copy_(e.view(packed.buffer)))

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        first = self.indices[0]
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_transformer_start, prepend=True))
        self._handles.append(self.transformer.register_forward_hook(self._on_transformer_end, always_call=True))
        if first > 0:
            self._handles.append(
                self.blocks[first - 1].register_forward_pre_hook(self._prefetch_hook(first), prepend=True))
        for index in self.indices:
            self._handles.append(self.blocks[index].register_forward_pre_hook(self._pre_hook(index), prepend=True))
            self._handles.append(self.blocks[index].register_forward_hook(self._post_hook(index), always_call=True))

    def _on_transformer_start(self, module, args):
        self.reset()  # a forward interrupted by a BaseException may have left copies installed
        self._check_structure()
        if self.indices[0] == 0:
            device = _device_of(args)
            if device is not None:
                self._load(0, device)

    def _on_transformer_end(self, module, args, output):
        self.reset()

    def _prefetch_hook(self, nxt: int):
        def hook(module, args):
            device = _device_of(args)
            if device is not None:
                self._load(nxt, device)
        return hook

    def _pre_hook(self, index: int):
        def hook(module, args):
            device = _device_of(args) or self.device
            if index not in self._loads:
                self._load(index, device)
            load = self._loads[index]
            if load.ready is not None:
                torch.cuda.current_stream(device).wait_event(load.ready)
                load.ready = None
            for e, tensor in zip(load.entries, load.tensors):
                e.install(tensor)
            if index + 1 in self._packed:
                self._load(index + 1, device)  # prefetch: copies while this block computes
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            self._release(index)
        return hook

    # ------------------------------------------------------------------ copies
    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _slot(self, slot: int, device: torch.device) -> Tensor:
        size = max(p.nbytes for p in self._packed.values())
        buffer = self._slots[slot]
        if buffer is None or buffer.numel() < size or buffer.device != device:
            with torch.inference_mode(False):
                buffer = torch.empty(size, dtype=torch.uint8, device=device)  # allocated on the compute stream
            self._slots[slot] = buffer
        return buffer

    def _load(self, index: int, device: torch.device) -> None:
        """Start copying block `index` into its slot (asynchronously on CUDA)."""
        if index in self._loads:
            return
        slot = self.indices.index(index) % _SLOTS
        for other, load in list(self._loads.items()):
            if load.slot == slot:  # only after an out-of-order call: never the block about to run
                self._release(other)
        packed = self._packed[index]
        buffer = self._slot(slot, device)
        entries = [e for e in packed.entries if e.exists()]
        with torch.inference_mode(False), torch.no_grad():
            load = _Load(slot, entries, [e.view(buffer) for e in entries])
            if device.type == "cuda":
                side = self._stream(device)
                # The side stream must not overwrite the slot before the compute stream is done with the
                # block that used it last (and with any earlier user of a fresh allocation).
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    buffer[:packed.nbytes].copy_(packed.buffer, non_blocking=True)
                    load.ready = torch.cuda.Event()
                    load.ready.record(side)
            else:
                buffer[:packed.nbytes].copy_(packed.buffer)
        self._loads[index] = load

    def _release(self, index: int) -> None:
        load = self._loads.pop(index, None)
        if load is None:
            return
        for e in load.entries:  # also those of a partly installed block (a pre-hook that failed midway)
            e.uninstall()

    def _check_structure(self) -> None:
        """Fail clearly if a swapped block's placeholder was replaced by real data behind our back."""
        for index, packed in self._packed.items():
            for e in packed.entries:
                current = e.current
                if current is not None and current.numel() != 0:
                    raise EasyAnimateError(
                        f"block swap: transformer_blocks.{index} {e.name} was given new data while swapped out. "
                        "Turn block swap off (remove()) before changing weights, or change LoRAs with "
                        "Pipeline.set_loras / inside block_swap.suspended(transformer).")


def _unchanged(found: list, packed: _Packed) -> bool:
    """Whether a block holds exactly the views of `packed` (same tensors, nothing added or removed)."""
    if len(found) != len(packed.entries):
        return False
    base = packed.buffer.data_ptr()
    for (module, name, is_param, t), e in zip(found, packed.entries):
        if (module is not e.module or name != e.name or is_param != e.is_param or t.dtype != e.dtype
                or tuple(t.shape) != e.shape or t.device != packed.buffer.device
                or (e.nbytes and t.data_ptr() != base + e.offset)):
            return False
    return True


def _device_of(args) -> torch.device | None:
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


def enable_block_swap(transformer: nn.Module, num_blocks: int, device) -> BlockSwap:
    """Swap the last `num_blocks` blocks of `transformer` (replacing any earlier block swap on it)."""
    disable_block_swap(transformer)
    return BlockSwap(transformer, num_blocks, device)


def get_block_swap(transformer: nn.Module) -> BlockSwap | None:
    """The active BlockSwap of `transformer`, or None."""
    return transformer.__dict__.get(_ATTR)


def disable_block_swap(transformer: nn.Module) -> None:
    """Turn block swap off on `transformer` if it is on (the model exactly as before)."""
    swap = get_block_swap(transformer)
    if swap is not None:
        swap.remove()


def reset_block_swap(transformer: nn.Module) -> None:
    """Release any swapped block left materialised (after an interrupted forward); no-op without block swap."""
    swap = get_block_swap(transformer)
    if swap is not None:
        swap.reset()


@contextmanager
def suspended(transformer: nn.Module) -> Iterator[None]:
    """Real tensors in the swapped blocks for the `with` body (e.g. to set LoRAs); a no-op without block swap."""
    swap = get_block_swap(transformer)
    if swap is None:
        yield
        return
    with swap.suspended():
        yield
