"""Where the engine's batches come from: the ``BatchSource`` protocol and a resumable adapter for
map-style datasets.

A batch source hands out ``next_batch(n)`` (a dict of tensors, ``n`` rows for this rank) and saves
its position in ``state_dict``, so a resumed run draws exactly the batches the interrupted one
would have. Generators (2-D toys, the shapes world) implement it directly; a dataset with
``__len__`` / ``__getitem__`` (CIFAR, CLEVR, caption shards) goes through ``MapDataSource``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


class BatchSource(Protocol):
    def next_batch(self, n: int) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _EpochSampler(Sampler[int]):
    """This rank's indices, epoch after epoch, from position ``(epoch, offset)`` on: each epoch is a
    permutation seeded by (seed, epoch), cut to a multiple of the world size and dealt round-robin."""

    def __init__(self, size: int, seed: int, rank: int, world: int, shuffle: bool, epoch: int, offset: int):
        self.size, self.seed, self.rank, self.world, self.shuffle = size, seed, rank, world, shuffle
        self.epoch, self.offset = epoch, offset

    def per_rank(self) -> int:
        return self.size // self.world

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            idx = torch.arange(self.size)
        else:
            idx = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return idx[: self.per_rank() * self.world][self.rank::self.world]  # (per_rank,)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = self.epoch, self.offset
        while True:  # endless: the engine asks for as many batches as the run has steps
            yield from self.order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0


class MapDataSource:
    """``next_batch(n)``: the next ``n`` examples of a map-style ``dataset`` for this rank, collated
    by ``collate_fn`` (default: torch's), read by a DataLoader with ``num_workers`` processes and
    pinned memory on CUDA. Its state is (epoch, position in the epoch): resuming reads the same
    examples in the same order."""

    def __init__(self, dataset: Dataset, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 num_workers: int = 0, collate_fn: Callable | None = None, pin_memory: bool | None = None):
        if len(dataset) < world_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than the {world_size} ranks")
        self.dataset, self.seed, self.rank, self.world, self.shuffle = dataset, seed, rank, world_size, shuffle
        self.num_workers, self.collate_fn = num_workers, collate_fn or default_collate
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.consumed = 0  # examples this rank has handed out
        self._it: Iterator | None = None
        self._n = 0

    def _position(self) -> tuple[int, int]:
        per_rank = len(self.dataset) // self.world
        return divmod(self.consumed, per_rank)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        if self._it is None or n != self._n:  # (re)start the loader at the current position
            epoch, offset = self._position()
            sampler = _EpochSampler(len(self.dataset), self.seed, self.rank, self.world, self.shuffle, epoch, offset)
            loader = DataLoader(self.dataset, batch_size=n, sampler=sampler, num_workers=self.num_workers,
                                collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                                persistent_workers=self.num_workers > 0,
                                # its own generator: starting a loader draws a seed, which must not
                                # move the global stream the loss draws from (exact resume)
                                generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            self._it, self._n = iter(loader), n
        self.consumed += n
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self._it = None
