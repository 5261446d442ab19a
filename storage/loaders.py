"""Batch loaders yielding (uint8 images [b, C, H, W], int64 labels [b]) on a device; augmentation is the
training loop's job (nfnet.augment.Augment, batched on the device).

Both loaders shard a global batch B across ranks the same way: rank r of W takes
perm[step*B + r*b : step*B + (r+1)*b] with b = B/W, so 1 x B and W x B/W see the same samples each step.
`images_per_sec` = images this rank received / seconds spent inside the loader's iterator during the last
epoch (the consumer's own time is excluded, so it is the loader's capacity).
"""

import hashlib
import time
from collections.abc import Iterator

import numpy as np
import torch

from storage.datasets import ShardSet, decode_encoded_hwc, open_dataset, read_verified_shard
from storage.uri import StorageError

DEFAULT_MAX_RESIDENT_BYTES = 8 << 30


def derive_seed(*parts: int) -> int:
    """The project's one seed mixer: an independent 63-bit seed per tuple of integers (seed, epoch, rank, …);
    seed + epoch would make (0, 1) and (1, 0) collide."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed(seed, epoch)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")


def _check(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool, what: str) -> int:
    _check_rank(rank, world_size)
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} must be a positive multiple of world_size {world_size}"
                         f"; use e.g. {max(1, batch_size // world_size) * world_size}")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size {batch_size} > {n} rows in {what} with drop_last=True would give zero "
                         "steps; lower batch_size or pass drop_last=False")
    return n // batch_size if drop_last else -(-n // batch_size)


class _Timed:
    images_per_sec: float = float("nan")
    epoch_wall_s: float = float("nan")

    def _timed(self, gen: Iterator) -> Iterator:
        busy, count, t_start = 0.0, 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(gen)
            except StopIteration:
                break
            busy += time.perf_counter() - t0
            count += len(y)
            yield x, y
        self.epoch_wall_s = time.perf_counter() - t_start
        self.images_per_sec = count / busy if busy > 0 else float("nan")

    def close(self) -> None:
        """Stop any work ahead (a streamed split's decoding); the loader is done."""


class ResidentLoader(_Timed):
    """Whole split as one uint8 tensor on `device`; batches are index gathers with a seeded per-epoch perm."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, device="cpu", shuffle: bool = True, drop_last: bool = True):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need uint8 images [N, C, H, W] and N labels; got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.steps_per_epoch = _check(len(labels), batch_size, rank, world_size, drop_last, "the split")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local_batch = batch_size // world_size
        self.shuffle, self.drop_last = shuffle, drop_last

    def __len__(self):
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))

    def _epoch(self, epoch: int):
        perm = self.order(epoch).to(self.device)
        B, b, r = self.batch_size, self.local_batch, self.rank
        for step in range(self.steps_per_epoch):
            idx = perm[step * B:(step + 1) * B][r * b:(r + 1) * b]  # a short last batch is split the same way
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._timed(self._epoch(epoch))


# ---------------------------------------------------------------- streaming (Ray Data)

def _decode_batch(batch: dict, shape, encoding: str, image_size: int | None) -> dict:
    """map_batches body (runs on CPU workers): image bytes -> uint8 [n, H, W, C] numpy. Rows stay HWC, as stored
    and as decoded: the consumer's permute to [C, H, W] is a view (channels_last memory, which the GPU wants)."""
    if encoding == "raw":
        c, h, w = shape
        flat = np.frombuffer(b"".join(batch["image"]), dtype=np.uint8) if len(batch["image"]) else \
            np.empty(0, np.uint8)
        if flat.size != len(batch["image"]) * c * h * w:
            raise StorageError(f"a shard row does not hold {c}x{h}x{w} bytes; manifest and shards disagree")
        images = flat.reshape(-1, h, w, c)
    else:
        images = decode_encoded_hwc(list(batch["image"]), image_size, "streamed shard")
    return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)}


def read_shards(batch, fs, dataset: str, verify: bool = True, num_classes: int | None = None) -> Iterator:
    """map_batches body (runs on CPU workers): rows naming shards (path, sha256, rows, and optionally `ranges`,
    the [start, stop) row ranges to keep) -> each shard's image/label rows, its checksum (and labels, given
    num_classes) verified first; a corrupt shard fails the read with its name."""
    ranges = batch["ranges"].to_pylist() if "ranges" in batch.column_names else [None] * batch.num_rows
    for path, sha, rows, keep in zip(batch["path"].to_pylist(), batch["sha256"].to_pylist(),
                                     batch["rows"].to_pylist(), ranges):
        table = read_verified_shard(fs, path, sha if verify else None, rows, dataset, num_classes)
        table = table.select(["image", "label"])
        for a, b in keep or [(0, rows)]:
            yield table.slice(a, b - a)


# Encoded blocks of ~16 MiB: 150-400 JPEGs, ~0.3 s of decoding per task. 4 MiB blocks cost ~20 % more CPU per
# image in Ray's per-block work (scheduling, object store, the driver) than these.
ENCODED_BLOCK_BYTES = 16 << 20


def ray_dataset(uri, split: str, image_size: int | None = None, verify: bool = True, pieces: list[dict] | None = None):
    """ray.data.Dataset of {'image': uint8 [H, W, C], 'label': int64} rows read from the split's shards.

    Each shard is read whole and checked against the manifest's sha256 (shards are at most max_shard_bytes,
    256 MiB by default, so a read task holds about that much). Encoded (JPEG/PNG) sets decode on every CPU
    whatever the number of shards: see _spread_decode. `pieces` (from epoch_pieces) replaces the split's shards,
    in order, by row ranges of them: one rank's epochs, as EpochStream reads them under Ray Train.
    """
    import ray.data

    ss = open_dataset(uri)
    m = ss.manifest
    if m.encoding == "encoded" and image_size is None and m.image_shape is None:
        raise StorageError(f"{ss.uri}: images have mixed sizes; pass image_size=<pixels> to stream them")
    shards = _shard_items(ss, split)
    pieces = shards if pieces is None else pieces
    ds = ray.data.from_items(pieces, override_num_blocks=max(1, len(pieces)))
    ds.context.execution_options.preserve_order = True  # same seed -> same row order (this dataset only)
    read = {} if m.encoding == "raw" else _spread_decode(ds.context, len(shards))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"fs": ss.fs, "dataset": ss.uri, "verify": verify, "num_classes": m.num_classes},
                        **read)
    return ds.map_batches(_decode_batch, batch_format="numpy", zero_copy_batch=True,
                          fn_kwargs={"shape": m.image_shape, "encoding": m.encoding, "image_size": image_size})


def _shard_items(ss: ShardSet, split: str) -> list[dict]:
    """The split's shards as read_shards takes them."""
    return [{"path": p, "sha256": s["sha256"], "rows": s["rows"]}
            for p, s in zip(ss.shard_paths(split), ss.manifest.shards[split])]


def epoch_pieces(uri, split: str, *, seed: int, epochs: range, rank: int = 0, world_size: int = 1,
                 rows_per_rank: int | None = None) -> list[dict]:
    """Row ranges of shards making up rank `rank`'s rows of each epoch, epochs in order. An epoch's rows are the
    split's shards in a seeded order, laid end to end on a circle and rotated by a seeded offset; rank r takes
    the rows_per_rank rows (default: an equal share, n // world_size) that start at r * rows_per_rank. Ranks get
    disjoint rows, every rank the same count, and a different part of the split each epoch."""
    shards = _shard_items(open_dataset(uri), split)
    n = sum(s["rows"] for s in shards)
    per = n // world_size if rows_per_rank is None else rows_per_rank
    if not 0 <= rank < world_size or per * world_size > n:
        raise ValueError(f"rank {rank} of {world_size} with {per} rows each does not fit split {split!r} ({n} rows)")
    out = []
    for epoch in epochs:
        g = np.random.default_rng(epoch_seed(seed, epoch))
        order = [shards[i] for i in g.permutation(len(shards))]
        ends = np.cumsum([s["rows"] for s in order])
        pos, left, mine = (int(g.integers(n)) + rank * per) % n if n else 0, per, []
        while left > 0:
            i = int(np.searchsorted(ends, pos, side="right"))
            start = pos - (int(ends[i - 1]) if i else 0)
            take = min(left, order[i]["rows"] - start)
            if mine and mine[0]["path"] == order[i]["path"]:  # wrapped round into the first shard: read it once
                mine[0]["ranges"].append([start, start + take])
            else:
                mine.append({**order[i], "ranges": [[start, start + take]]})
            left -= take
            pos = (pos + take) % n
        out += mine
    return out


def _spread_decode(context, shards: int) -> dict:
    """Decoding a JPEG costs ~1000x reading it. Ray fuses read and decode into one task per shard by default,
    so decode ran on as many CPUs as there are shards (one, for a set of a few thousand images). Small blocks
    (this dataset only) cut a shard into many decode inputs, and a task pool of the read's own (sized to the
    shard count, so no limit in effect) stops the fusion, since Ray fuses only pools of equal size: decode
    tasks then take any shard's blocks on every CPU. -> map_batches kwargs of the read."""
    import ray.data

    context.target_max_block_size = ENCODED_BLOCK_BYTES
    return {"compute": ray.data.TaskPoolStrategy(size=max(1, shards))}


_DTYPES = {"image": torch.uint8, "label": torch.int64}


def iter_torch_batches(data, batch_size: int | None, device="cpu", *, drop_last: bool = True,
                       prefetch_batches: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ray Dataset or DataIterator of ray_dataset rows -> (uint8 images [b, C, H, W], int64 labels) on device; the
    images are a view of the HWC rows (channels_last memory). batch_size None: Ray's blocks as they come."""
    batches = data.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last, dtypes=_DTYPES,
                                      prefetch_batches=prefetch_batches)
    for b in batches:
        yield b["image"].permute(0, 3, 1, 2), b["label"]


def local_shuffle(batches, batch_size: int, capacity: int, seed: int, drop_last: bool):
    """Seeded local shuffle of a stream of (images, labels) batches, by windows: incoming batches are held as they
    are (views, no copy) until `capacity` rows are in; the window's rows are then permuted and leave as full
    batches, each row copied once, straight into its batch; the rows short of a batch wait for the next window.
    (Ray's local shuffle buffer re-concatenates what it holds as it drains; a slot buffer copied every row in and
    out again: on this project's CPUs a 150 KB row costs ~0.07 ms per copy.)"""
    gen = torch.Generator().manual_seed(seed)
    cap = max(capacity, batch_size)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    count = 0
    for x, y in batches:
        held.append((x, y))
        count += len(y)
        if count >= cap:
            batches_out, held = _window(held, count, batch_size, gen, last=False, drop_last=drop_last)
            count = sum(len(y) for _, y in held)
            yield from batches_out
    if count:
        yield from _window(held, count, batch_size, gen, last=True, drop_last=drop_last)[0]


def _window(held, count: int, batch_size: int, gen, *, last: bool, drop_last: bool):
    """-> (the window's shuffled batches, [its leftover rows] to carry). Rows of one held piece go into a batch
    with one index_select each, so a batch is grouped by piece (in random order within a piece)."""
    piece = torch.repeat_interleave(torch.arange(len(held)), torch.tensor([len(y) for _, y in held]))
    start = torch.tensor([0] + [len(y) for _, y in held]).cumsum(0)
    perm = torch.randperm(count, generator=gen)
    full = count // batch_size
    groups = [perm[i * batch_size:(i + 1) * batch_size] for i in range(full)]
    rest = perm[full * batch_size:]
    if last and len(rest) and not drop_last:
        groups.append(rest)

    def gather(rows):
        rows = rows[torch.argsort(piece[rows], stable=True)]
        x0, y0 = held[0]
        xs = torch.empty((len(rows), *x0.shape[1:]), dtype=x0.dtype)
        ys = torch.empty((len(rows), *y0.shape[1:]), dtype=y0.dtype)
        at = 0
        for p, n in zip(*torch.unique_consecutive(piece[rows], return_counts=True)):
            idx = rows[at:at + n] - start[p]
            torch.index_select(held[p][0], 0, idx, out=xs[at:at + n])
            torch.index_select(held[p][1], 0, idx, out=ys[at:at + n])
            at += int(n)
        return xs, ys

    out = (gather(g) for g in groups)
    carry = [] if last or not len(rest) else [gather(rest)]
    return out, carry


class EpochStream(_Timed):
    """One rank's training batches of a run's epochs [0, epochs) from ONE Ray Data execution (rows from
    epoch_pieces): the next epoch's shards are read and decoded while this one drains. A new execution per epoch
    (streaming_split's per-epoch barrier under Ray Train) left the CPUs idle at the start of every epoch (one
    task reading a shard) and at its end (the last decode tasks). Each epoch is exactly steps_per_epoch batches of
    batch_size rows of that epoch only, through a seeded local shuffle buffer of shuffle_batches batches. The
    first epoch asked for (0, or a resumed run's) starts the execution; the next epochs continue it, and any other
    epoch starts a new one from there."""

    def __init__(self, uri, split: str, *, batch_size: int, seed: int, epochs: int, rank: int = 0,
                 world_size: int = 1, device="cpu", image_size: int | None = None, shuffle_batches: int = 8):
        self.shardset = open_dataset(uri)
        n = self.shardset.rows(split)
        _check_rank(rank, world_size)
        if batch_size < 1 or n // world_size < batch_size:
            raise ValueError(f"split {split!r} has {n} rows, {n // world_size} per rank over {world_size}: not one "
                             f"batch of {batch_size} per epoch; lower the batch size or use fewer workers")
        self.steps_per_epoch = (n // world_size) // batch_size
        self.split, self.batch_size, self.seed, self.image_size = split, batch_size, seed, image_size
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.capacity, self.epochs = shuffle_batches * batch_size, epochs
        self._blocks = self._held = self._next = None  # nothing runs until an epoch is asked for

    def __len__(self):
        return self.steps_per_epoch

    def _start(self, epoch: int) -> None:
        """A new execution for epochs [epoch, self.epochs) (this one at least); it runs from the first block asked."""
        self.close()
        pieces = epoch_pieces(self.shardset, self.split, seed=self.seed,
                              epochs=range(epoch, max(self.epochs, epoch + 1)), rank=self.rank,
                              world_size=self.world_size, rows_per_rank=self.steps_per_epoch * self.batch_size)
        ds = ray_dataset(self.shardset, self.split, self.image_size, pieces=pieces)
        # Ray Data reserves part of the CPUs for each operator; with a read pool of one task per shard beside the
        # decode, that reservation left decode slots empty (1050 -> 1230 images/s on 2 CPUs without it).
        ds.context.op_resource_reservation_enabled = False
        self._blocks = iter(ds.iter_torch_batches(batch_size=None, dtypes=_DTYPES, prefetch_batches=2))
        self._next = epoch

    def _rows(self, n: int):
        """The stream's next n rows, as the (HWC images, labels) pieces of Ray blocks they come in."""
        while n > 0:
            if self._held is not None:
                (x, y), self._held = self._held, None
            else:
                b = next(self._blocks)
                x, y = b["image"], b["label"]
            if len(y) > n:
                self._held = x[n:], y[n:]
                x, y = x[:n], y[:n]
            n -= len(y)
            yield x, y

    def _epoch(self, epoch: int):
        if epoch != self._next:
            self._start(epoch)
        self._next = None  # until this epoch is drained: one left half-way makes the next start afresh
        rows = self._rows(self.steps_per_epoch * self.batch_size)
        for x, y in local_shuffle(rows, self.batch_size, self.capacity, derive_seed(self.seed, epoch) % 2**32, True):
            # HWC rows -> [b, C, H, W] view; .to keeps the channels_last strides
            yield x.to(self.device, non_blocking=True).permute(0, 3, 1, 2), y.to(self.device, non_blocking=True)
        if epoch + 1 < self.epochs:
            self._next = epoch + 1
        else:  # the stream's rows are all taken: let Ray's iterator finish, not be collected
            if next(self._blocks, None) is not None:
                raise StorageError("the Ray Data stream held more rows than its epochs; this is a bug")
            self._blocks = None

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._timed(self._epoch(epoch))

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()  # Ray shuts the execution down
        self._blocks = self._held = self._next = None


class StreamingLoader(_Timed):
    """Ray Data pipeline; each epoch is a seeded global random_shuffle of the split.

    Standalone multi-rank use reads every global batch and keeps this rank's slice (same samples as the
    resident loader's rule); under Ray Train each rank streams only its own rows (EpochStream).
    """

    def __init__(self, uri, split: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device="cpu", shuffle: bool = True, drop_last: bool = True, image_size: int | None = None):
        self.shardset = open_dataset(uri)
        n = self.shardset.rows(split)
        self.steps_per_epoch = _check(n, batch_size, rank, world_size, drop_last, f"split {split!r}")
        self.dataset = ray_dataset(self.shardset, split, image_size)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local_batch = batch_size // world_size
        self.device, self.shuffle, self.drop_last = torch.device(device), shuffle, drop_last

    def __len__(self):
        return self.steps_per_epoch

    def _epoch(self, epoch: int):
        ds = self.dataset.random_shuffle(seed=epoch_seed(self.seed, epoch) % (2**32)) if self.shuffle \
            else self.dataset
        b, r = self.local_batch, self.rank
        batches = iter_torch_batches(ds, self.batch_size, "cpu", drop_last=self.drop_last)
        for _, (x, y) in zip(range(self.steps_per_epoch), batches):
            yield x[r * b:(r + 1) * b].to(self.device), y[r * b:(r + 1) * b].to(self.device)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._timed(self._epoch(epoch))


def loader_mode(dataset, split: str, mode: str = "auto", image_size: int | None = None,
                max_resident_bytes: int = DEFAULT_MAX_RESIDENT_BYTES) -> str:
    """'resident' or 'streaming': `mode` itself unless 'auto', then by whether the decoded split fits."""
    if mode not in ("auto", "resident", "streaming"):
        raise ValueError(f"mode must be 'auto', 'resident' or 'streaming', got {mode!r}")
    if mode != "auto":
        return mode
    return "resident" if open_dataset(dataset).decoded_bytes(split, image_size) <= max_resident_bytes else "streaming"


def make_loader(dataset, split: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                device="cpu", mode: str = "auto", shuffle: bool = True, drop_last: bool = True,
                max_resident_bytes: int = DEFAULT_MAX_RESIDENT_BYTES, image_size: int | None = None,
                verify: bool = True) -> "ResidentLoader | StreamingLoader":
    """Resident when the decoded split fits in max_resident_bytes (or mode='resident'), else streaming."""
    ss: ShardSet = open_dataset(dataset)
    _check(ss.rows(split), batch_size, rank, world_size, drop_last, f"split {split!r}")
    mode = loader_mode(ss, split, mode, image_size, max_resident_bytes)
    common = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                  shuffle=shuffle, drop_last=drop_last)
    if mode == "streaming":
        return StreamingLoader(ss, split, image_size=image_size, **common)
    x, y = ss.load_split(split, verify=verify, image_size=image_size)
    return ResidentLoader(x, y, **common)
