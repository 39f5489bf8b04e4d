"""Base of the device-resident training loaders: seeded epochs, DDP shards, a length MONAI's trainer can read.

A loader here is an iterable of ready batches (dicts of tensors already on the device): no ``DataLoader``, no worker
processes, no collation. Each epoch draws from its own ``torch.Generator`` (on the device's generator type) seeded from
``(seed, rank, epoch)``, so an epoch's batches depend only on the run seed, the rank and the epoch number -- also after
``--resume`` when the loader is attached to the trainer (:meth:`DeviceBatchLoader.attach` sets the epoch at
``EPOCH_STARTED``); without it the epochs are counted by the loader itself, from 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Randomizable, Transform

from networks.perf import resolve_device

__all__ = [
    "as_plain",
    "deterministic_head",
    "resolve_device",
    "resolve_rank",
    "shard",
    "epoch_seed",
    "DeviceBatchLoader",
]

logger = logging.getLogger(__name__)


def as_plain(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of ``x`` (MetaTensor meta dropped; arrays converted)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def deterministic_head(transform: Compose) -> Compose:
    """The part of ``transform`` that ``CacheDataset`` would cache: up to the first random transform or
    :class:`~transforms.CacheBoundary` (any callable that is not a MONAI ``Transform``)."""
    ops = []
    for op in transform.transforms:
        if isinstance(op, Randomizable) or not isinstance(op, Transform):
            break
        ops.append(op)
    return Compose(ops)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: given values, else those of the initialised process group, else ``(0, 1)``.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return int(rank), int(world_size)


def shard(items: Sequence[Any], rank: int, world_size: int) -> tuple[list[Any], int]:
    """This rank's items and the number of items every rank visits per epoch.

    Rank ``r`` keeps ``items[r::world_size]`` for the whole run (it caches only those). Every rank visits
    ``ceil(len(items) / world_size)`` items per epoch -- the count of MONAI's ``DistributedSampler(even_divisible=True)``
    -- so all ranks run the same number of steps (a rank whose shard is one item short repeats one).

    Raises:
        ValueError: fewer items than ranks, or a bad rank.
    """
    rank, world_size = resolve_rank(rank, world_size)
    if len(items) < world_size:
        raise ValueError(f"{len(items)} training items cannot be sharded over {world_size} ranks (need >= 1 each)")
    return list(items[rank::world_size]), math.ceil(len(items) / world_size)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit generator seed derived from ``(seed, rank, epoch)`` (numpy ``SeedSequence``: nearby inputs give
    unrelated streams)."""
    state = np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


class DeviceBatchLoader:
    """Iterable of training batches built on the device; subclasses implement :meth:`make_batch`.

    Per epoch, ``items_per_epoch`` item ids are drawn from successive random permutations of the ``num_items`` local
    items and cut into batches of ``items_per_batch`` (the last one may be smaller, as a ``DataLoader`` without
    ``drop_last``); with ``epoch_length`` given, exactly that many full batches instead.

    It is also an ignite handler: ``attach(trainer)`` makes the trainer's epoch number choose the epoch's seed.

    Args:
        num_items: items held by this rank (> 0).
        items_per_epoch: items visited per epoch.
        items_per_batch: items per batch.
        epoch_length: batches per epoch (None: ``ceil(items_per_epoch / items_per_batch)``).
        seed: run seed.
        rank: this process' rank (part of the seed).
        device: where the batches are built.

    Raises:
        ValueError: non-positive counts.
    """

    def __init__(
        self,
        num_items: int,
        items_per_epoch: int,
        items_per_batch: int,
        *,
        epoch_length: int | None = None,
        seed: int = 0,
        rank: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        for name, value in (
            ("num_items", num_items),
            ("items_per_epoch", items_per_epoch),
            ("items_per_batch", items_per_batch),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if epoch_length is not None and int(epoch_length) < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
        self.num_items = int(num_items)
        self.items_per_batch = int(items_per_batch)
        self.fixed_length = epoch_length is not None
        self.epoch_length = (
            int(epoch_length) if epoch_length is not None else math.ceil(int(items_per_epoch) / self.items_per_batch)
        )
        self.items_per_epoch = self.epoch_length * self.items_per_batch if self.fixed_length else int(items_per_epoch)
        self.seed, self.rank = int(seed), int(rank)
        self.device = resolve_device(device)
        self._next_epoch = 1

    def __len__(self) -> int:
        return self.epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s seed for the next iteration (later iterations continue from ``epoch + 1``)."""
        self._next_epoch = int(epoch)

    def attach(self, engine: Any) -> None:
        """Set the epoch from ``engine.state.epoch`` at every ``EPOCH_STARTED`` (resumed runs replay the same data)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        """Handler body: :meth:`set_epoch` with the engine's epoch."""
        self.set_epoch(engine.state.epoch)

    def generator(self, epoch: int) -> torch.Generator:
        """The generator of ``epoch`` on this loader's device."""
        g = torch.Generator(device=self.device)
        g.manual_seed(epoch_seed(self.seed, self.rank, epoch))
        return g

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """``items_per_epoch`` local item ids from successive random permutations (long tensor on the device)."""
        reps = math.ceil(self.items_per_epoch / self.num_items)
        perms = [torch.randperm(self.num_items, generator=generator, device=self.device) for _ in range(reps)]
        return torch.cat(perms)[: self.items_per_epoch]

    def make_batch(self, item_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Build the batch of ``item_ids`` (subclasses)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a generator: the epoch is read at the first next(), i.e. after the trainer's EPOCH_STARTED handlers ran
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        g = self.generator(epoch)
        order = self.epoch_order(g)
        for start in range(0, self.items_per_epoch, self.items_per_batch):
            yield self.make_batch(order[start : start + self.items_per_batch], g)
