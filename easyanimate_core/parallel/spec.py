"""The parallel layout asked for ("ulysses=2,cfg=2") and its checks against a model and a world size."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedRequestError

DEGREE_NAMES = ("ulysses", "cfg")


class ParallelError(UnsupportedRequestError):
    """The parallel layout cannot run as asked (bad spec, world size, backend, heads, a dead worker)."""


@dataclass(frozen=True)
class ParallelSpec:
    """Degrees of the two splits: `ulysses` ranks share one sequence, `cfg` groups share a guided step."""

    ulysses: int = 1
    cfg: int = 1

    @property
    def world_size(self) -> int:
        return self.ulysses * self.cfg

    def __str__(self) -> str:
        return f"ulysses={self.ulysses},cfg={self.cfg}"

    def check_heads(self, heads: int) -> None:
        """Ulysses gives each rank heads / ulysses whole heads: the degree must divide the head count."""
        if self.ulysses > heads:
            raise ParallelError(
                f"ulysses={self.ulysses} asks for more ranks than the model has attention heads ({heads}): each "
                f"rank needs at least one whole head. Use ulysses ≤ {heads} (a divisor of {heads}: "
                f"{_divisors(heads)}), and add cfg=2 for more GPUs.")
        if heads % self.ulysses:
            raise ParallelError(
                f"ulysses={self.ulysses} does not divide the model's {heads} attention heads; use one of "
                f"{_divisors(heads)}.")

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ParallelError(
                f"--parallel {self} needs ulysses × cfg = {self.world_size} processes, but the process group has "
                f"{world_size}: start as many (torchrun --nproc-per-node {self.world_size}) or change the degrees.")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def parse_parallel(spec) -> ParallelSpec:
    """A ParallelSpec from "ulysses=2,cfg=2" (either part optional, any order), a dict, or a ParallelSpec."""
    if isinstance(spec, ParallelSpec):
        return spec
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = str(spec).strip()
        if not text:
            raise ParallelError('empty parallel spec; write e.g. "ulysses=2,cfg=2"')
        items = []
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise ParallelError(f"parallel spec part {part.strip()!r} is not name=degree; write e.g. "
                                    '"ulysses=2,cfg=2"')
            items.append((name.strip().lower(), value.strip()))
    degrees = {}
    for name, value in items:
        if name not in DEGREE_NAMES:
            raise ParallelError(f"unknown parallel degree {name!r}; use {' and '.join(DEGREE_NAMES)} "
                                '(e.g. "ulysses=2,cfg=2")')
        if name in degrees:
            raise ParallelError(f"parallel degree {name!r} given twice")
        try:
            degree = int(value)
        except (TypeError, ValueError):
            raise ParallelError(f"parallel degree {name}={value!r} is not a whole number") from None
        if degree < 1:
            raise ParallelError(f"parallel degree {name}={degree} must be at least 1")
        degrees[name] = degree
    if degrees.get("cfg", 1) > 2:
        raise ParallelError(f"cfg={degrees['cfg']}: classifier-free guidance has two halves, so cfg is 1 or 2")
    return ParallelSpec(**degrees)
