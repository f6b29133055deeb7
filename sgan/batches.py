"""Which images each process sees at each step: a pure function of (seed, step, rank).

The datasets are small enough to sit in memory, so batches are index slices of in-memory tensors rather
than DataLoader iterations. Because nothing here keeps state, a run resumed at step s sees exactly the
batches an uninterrupted run sees, and N processes together see exactly the global batch one process
would see with N times the batch size (rank r takes the r-th slice of each global batch).
"""
from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs, platforms and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def permutation(n: int, *seed_parts) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(*seed_parts)))


class IndexStream:
    """An endless stream of dataset indices: one shuffled pass after another (pass p shuffled by (seed, name, p)).

    `take(start, count)` returns stream positions start .. start + count - 1, on `device`. A pass is drawn on
    the CPU (the same on every device) and copied to the device once: the batches of a pass are slices of it,
    so drawing them never waits for the device."""

    def __init__(self, size: int, seed: int, name: str, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"{name}: cannot draw batches from an empty set")
        self.size, self.seed, self.name, self.device = size, seed, name, torch.device(device)
        self._cached: tuple[int, torch.Tensor] | None = None

    def _pass(self, p: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != p:
            self._cached = (p, permutation(self.size, self.seed, self.name, p).to(self.device))
        return self._cached[1]

    def take(self, start: int, count: int) -> torch.Tensor:
        pieces = []
        while count > 0:
            p, offset = divmod(start, self.size)
            piece = self._pass(p)[offset: offset + count]
            pieces.append(piece)
            start += len(piece)
            count -= len(piece)
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long, device=self.device)


class StepBatches:
    """Per-step index batches for one process: `batch_size` per process, `world_size` processes."""

    def __init__(self, size: int, batch_size: int, seed: int, name: str, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.stream = IndexStream(size, seed, name, device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def indices(self, step: int) -> torch.Tensor:
        global_batch = self.batch_size * self.world_size
        return self.stream.take(step * global_batch + self.rank * self.batch_size, self.batch_size)


def steps_per_epoch(size: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches in one pass over `size` images (the remainder rolls into the next pass)."""
    steps = size // (batch_size * world_size)
    if steps < 1:
        fix = f"lower --batch-size to {size // world_size} or less, or add images" if size >= world_size else \
            f"add images (each of the {world_size} processes needs one a step), or use fewer processes"
        raise ValueError(f"--batch-size {batch_size} x {world_size} process(es) is larger than the {size} training "
                         f"images: {fix}")
    return steps


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNG (noise, dropout) for one step of one process: different per rank and step,
    identical when a run is resumed at that step."""
    torch.manual_seed(derived_seed(seed, "step", step, rank))


def shard(n: int, rank: int, world_size: int) -> range:
    """This process's share of n items for evaluation: every item lands on exactly one process."""
    return range(rank, n, world_size)
