"""Deterministic, resumable, process-sharded batch order.

The order is a pure function of (seed, epoch): epoch e visits `randperm(N)` drawn from a generator seeded by
hash(seed, e). Each step takes one *global* batch of `world_size * batch_size` consecutive indices; process r gets
its `batch_size`-long slice. So a run on W processes with per-process batch B sees exactly the samples of a 1-process
run with batch W*B, and the position in the stream is one integer (micro-batches consumed) that a checkpoint stores.
The last incomplete global batch of an epoch is dropped so all processes take the same number of steps.

Each item also carries its per-sample seed hash(seed, "sample", position, j), j its place in the global micro-batch
(rank * batch_size + i): the key of the training task's per-sample draws (noise, times, label dropout), so they too
are the same for any process count (STYLE.md §5; with grad_accum_steps=1 a global micro-batch is a global batch).

Shards (`ShardBatchSampler`) are read in another order, so that each process and each DataLoader worker reads its
own shards, forward through each file; its docstring gives the rules. `build_batch_sampler` picks the sampler a
dataset needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ldm.config import ConfigError
from ldm.seeding import derive_seed


class ResumableBatchSampler:
    """Yields lists of (dataset_index, item_seed, sample_seed) for this process, forever, starting at `start`
    micro-batches. item_seed keys the data augmentation (with the index), sample_seed the task's per-sample draws."""

    layout = None  # the order depends neither on the process count nor on the loader workers

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


# ------------------------------------------------------------------------------------------------------ shards
def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `buffer_size` items emits a stream of n items (positions 0..n-1).

    tf.data's `Dataset.shuffle` rule (WebDataset's `shuffle` stage is a variant that starts emitting before its
    buffer is full): fill the buffer with the first items; then for each further item emit a uniformly drawn buffer
    slot and put the item in its place; at the end emit what is left in a random order. The draws:
    `rng.integers(0, size, n - size)` for the slots, then `rng.permutation(size)` for the rest. An item is emitted at
    most `buffer_size - 1` places before its arrival, so a reader moves forward through its input. buffer_size <= 1
    keeps the input order."""
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer_size, n)
    buf = list(range(size))
    out = []
    for new, k in zip(range(size, n), rng.integers(0, size, n - size).tolist()):
        out.append(buf[k])
        buf[k] = new
    out.extend(np.asarray(buf)[rng.permutation(size)].tolist())
    return np.asarray(out, dtype=np.int64)


class ShardBatchSampler:
    """Batches over a sharded dataset (the items of shard s are `shard_ranges[s]`) such that every process and every
    DataLoader worker reads its own shards. Yields lists of (dataset_index, item_seed, sample_seed) forever from
    `start` micro-batches, as `ResumableBatchSampler` does.

    Streams. A process has K = max(1, num_workers) streams; stream w of process r is global stream g = r * K + w.
    In epoch e the shards are permuted by a generator seeded by hash(seed, "shards", e) and dealt round-robin: stream
    g takes permuted shards g, g + G, g + 2G, ... (G = world_size * K streams), reads them in that order and passes
    their items through a shuffle buffer (`shuffle_buffer_order`, seeded by hash(seed, "buffer", e, g)) that is
    emptied at the end of the epoch; then it goes on with epoch e + 1. Each stream is an endless sequence in which
    every item of its shards appears exactly once per epoch.

    Batches. Micro-batch p of a process is the next `batch_size` items of its stream p mod K. A DataLoader hands the
    batches to its workers in turn, so a worker always gets the batches of one stream (stream (start + k) mod K for
    worker k) and reads only that stream's shards. Item seeds are hash(seed, "item", the item's epoch), sample seeds
    hash(seed, "sample", p, rank * batch_size + j), as in ResumableBatchSampler.

    Resume. Position p fixes how many batches each stream has given, so a sampler started at p continues exactly
    where an unbroken one is. The order depends on (seed, world_size, K, buffer_size, batch_size); `layout` names the
    process and stream counts, which a checkpoint records (`refuse_layout_change`).

    Epochs. Streams get unequal shares of an epoch when shard sizes or counts do not divide evenly, so they reach
    the next epoch a few batches apart; `batches_per_epoch` (items // global batch) is the nominal length that
    train.max_epochs counts. Fewer shards than streams would leave a stream with none: refused.
    """

    def __init__(self, shard_ranges: Sequence[tuple[int, int]], batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, buffer_size: int = 1000, start: int = 0):
        self.ranges = [(int(a), int(b)) for a, b in shard_ranges]
        self.n = sum(b - a for a, b in self.ranges)
        self.streams = max(1, num_workers)
        if len(self.ranges) < world_size * self.streams:
            raise ValueError(f"the data has {len(self.ranges)} shards, fewer than processes x loader workers = "
                             f"{world_size} x {self.streams}, and every worker reads its own shards: write more, "
                             f"smaller shards (`ldm make-shards --shard-size`) or lower data.num_workers")
        if self.n < batch_size * world_size:
            raise ValueError(f"the dataset has {self.n} items, fewer than one global batch of "
                             f"{batch_size * world_size} (train.batch_size / grad_accum_steps); lower "
                             f"train.batch_size or add data")
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, buffer_size
        self.rank, self.world_size, self.start = rank, world_size, start

    @property
    def layout(self) -> dict[str, int]:
        return {"processes": self.world_size, "workers": self.streams}

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def stream_shards(self, epoch: int, stream: int) -> list[int]:
        """The shards global stream `stream` reads in `epoch`, in order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch))
        order = torch.randperm(len(self.ranges), generator=g).tolist()
        return order[stream::self.world_size * self.streams]

    def stream_epoch(self, epoch: int, stream: int) -> np.ndarray:
        """The items global stream `stream` reads in `epoch`, in order."""
        shards = self.stream_shards(epoch, stream)
        items = np.concatenate([np.arange(*self.ranges[s], dtype=np.int64) for s in shards])
        rng = np.random.default_rng(derive_seed(self.seed, "buffer", epoch, stream))
        return items[shuffle_buffer_order(len(items), self.buffer_size, rng)]

    def _stream(self, stream: int, skip: int) -> Iterator[tuple[int, int]]:
        """(item, epoch) of a global stream from its item `skip` on, endlessly (epochs before it are skipped by
        their length alone)."""
        epoch = 0
        while True:
            length = sum(self.ranges[s][1] - self.ranges[s][0] for s in self.stream_shards(epoch, stream))
            if skip >= length:
                skip -= length
            else:
                for i in self.stream_epoch(epoch, stream)[skip:].tolist():
                    yield i, epoch
                skip = 0
            epoch += 1

    def __iter__(self):
        k, bs = self.streams, self.batch_size
        # stream w has given one batch for each earlier position p with p mod k == w
        streams = [self._stream(self.rank * k + w, bs * len(range(w, self.start, k))) for w in range(k)]
        position = self.start
        while True:
            batch = []
            for j in range(bs):
                i, epoch = next(streams[position % k])
                item_seed = derive_seed(self.seed, "item", epoch) % (1 << 31)
                batch.append((i, item_seed, derive_seed(self.seed, "sample", position, self.rank * bs + j)))
            yield batch
            position += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is infinite, report one nominal epoch
        return self.batches_per_epoch


def build_batch_sampler(dataset, batch_size: int, *, seed: int, rank: int, world_size: int, start: int,
                        num_workers: int, shuffle_buffer: int):
    """The batch sampler of `dataset`: `ShardBatchSampler` when it reads shards (it has `shard_ranges` that are not
    None), else `ResumableBatchSampler` (to which num_workers and shuffle_buffer do not matter)."""
    ranges = getattr(dataset, "shard_ranges", None)
    if ranges is None:
        return ResumableBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                     start=start)
    return ShardBatchSampler(ranges, batch_size, seed=seed, rank=rank, world_size=world_size,
                             num_workers=num_workers, buffer_size=shuffle_buffer, start=start)


def refuse_layout_change(saved: dict | None, now: dict | None) -> None:
    """ConfigError when a resumed run would split its shard streams otherwise than the checkpoint's run (`saved`: a
    sampler's `layout` as the checkpoint recorded it; None for orders that need none)."""
    if saved is None or saved == now:
        return
    now = now or {}
    raise ConfigError(f"the checkpoint's run read its shards as {saved.get('processes')} process(es) x "
                      f"{saved.get('workers')} loader stream(s) (data.num_workers, at least 1); this one would read "
                      f"them as {now.get('processes')} x {now.get('workers')}. Which shards each worker reads, and so "
                      f"the batches, depend on both: resume with the same process count and data.num_workers, or "
                      f"start a new run (name=...) from this checkpoint (train.resume=<checkpoint>)")
