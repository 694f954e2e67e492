"""Deterministic, resumable, process-sharded batch order.

The order is a pure function of (seed, epoch): epoch e visits `randperm(N)` drawn from a generator seeded by
hash(seed, e). Each step takes one *global* batch of `world_size * batch_size` consecutive indices; process r gets
its `batch_size`-long slice. So a run on W processes with per-process batch B sees exactly the samples of a 1-process
run with batch W*B, and the position in the stream is one integer (micro-batches consumed) that a checkpoint stores.
The last incomplete global batch of an epoch is dropped so all processes take the same number of steps.

Each item also carries its per-sample seed hash(seed, "sample", position, j), j its place in the global micro-batch
(rank * batch_size + i): the key of the training task's per-sample draws (noise, times, label dropout), so they too
are the same for any process count (STYLE.md §5; with grad_accum_steps=1 a global micro-batch is a global batch).
"""

from __future__ import annotations

import torch

from ldm.seeding import derive_seed


class ResumableBatchSampler:
    """Yields lists of (dataset_index, item_seed, sample_seed) for this process, forever, starting at `start`
    micro-batches. item_seed keys the data augmentation (with the index), sample_seed the task's per-sample draws."""

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if n < batch_size * world_size:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch of {batch_size * world_size} "
                             f"(train.batch_size / grad_accum_steps); lower train.batch_size or add data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for b in range(offset, self.batches_per_epoch):
                first = (b * self.world_size + self.rank) * self.batch_size
                idx = order[first:first + self.batch_size].tolist()
                item_seed = derive_seed(self.seed, "item", epoch) % (1 << 31)
                yield [(i, item_seed, derive_seed(self.seed, "sample", position, self.rank * self.batch_size + j))
                       for j, i in enumerate(idx)]
                position += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is infinite, report one epoch
        return self.batches_per_epoch


def split_key(key: tuple[int, ...] | int) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(index, item_seed, extra item fields) of a dataset key: an index i (seed i), (index, item_seed), or the
    sampler's (index, item_seed, sample_seed), whose sample seed the item carries on as "sample_seed" (int64)."""
    if not isinstance(key, tuple):
        return key, key, {}
    if len(key) == 3:
        return key[0], key[1], {"sample_seed": torch.tensor(key[2], dtype=torch.int64)}
    index, seed = key
    return index, seed, {}


def sample_generators(sample_seeds: torch.Tensor, purpose: str,
                      device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by hash(sample_seed, purpose): the per-sample draws of a training step
    (`purpose` names the draw, e.g. "noise", so two draws of one sample are independent streams)."""
    return [torch.Generator(device=device).manual_seed(derive_seed(s, purpose)) for s in sample_seeds.tolist()]
