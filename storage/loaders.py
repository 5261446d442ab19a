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

from storage.datasets import ShardSet, decode_encoded, open_dataset, read_verified_shard
from storage.uri import StorageError

DEFAULT_MAX_RESIDENT_BYTES = 8 << 30


def derive_seed(*parts: int) -> int:
    """The project's one seed mixer: an independent 63-bit seed per tuple of integers (seed, epoch, rank, …);
    seed + epoch would make (0, 1) and (1, 0) collide."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed(seed, epoch)


def _check(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool, what: str) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
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
    """map_batches body (runs on CPU workers): image bytes -> uint8 [n, C, H, W] numpy."""
    if encoding == "raw":
        c, h, w = shape
        flat = np.frombuffer(b"".join(batch["image"]), dtype=np.uint8) if len(batch["image"]) else \
            np.empty(0, np.uint8)
        if flat.size != len(batch["image"]) * c * h * w:
            raise StorageError(f"a shard row does not hold {c}x{h}x{w} bytes; manifest and shards disagree")
        images = flat.reshape(-1, h, w, c).transpose(0, 3, 1, 2)
    else:
        images = decode_encoded(list(batch["image"]), image_size, "streamed shard").numpy()
    return {"image": np.ascontiguousarray(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def read_shards(batch, fs, dataset: str, verify: bool = True) -> Iterator:
    """map_batches body (runs on CPU workers): rows naming shards (path, sha256, rows) -> each shard's
    image/label rows, its checksum verified first; a corrupt shard fails the read with its name."""
    for path, sha, rows in zip(batch["path"].to_pylist(), batch["sha256"].to_pylist(), batch["rows"].to_pylist()):
        yield read_verified_shard(fs, path, sha if verify else None, rows, dataset).select(["image", "label"])


# Encoded blocks of ~16 MiB: 150-400 JPEGs, ~0.3 s of decoding per task. 4 MiB blocks cost ~20 % more CPU per
# image in Ray's per-block work (scheduling, object store, the driver) than these.
ENCODED_BLOCK_BYTES = 16 << 20


def ray_dataset(uri, split: str, image_size: int | None = None, verify: bool = True):
    """ray.data.Dataset of {'image': uint8 [C, H, W], 'label': int64} rows read from the split's shards.

    Pass it to TorchTrainer(datasets={"train": ...}); workers read ray.train.get_dataset_shard("train") and
    wrap it with iter_torch_batches. Each shard is read whole and checked against the manifest's sha256
    (shards are at most max_shard_bytes, 256 MiB by default, so a read task holds about that much).
    Encoded (JPEG/PNG) sets decode on every CPU whatever the number of shards: see _spread_decode.
    """
    import ray.data

    ss = open_dataset(uri)
    m = ss.manifest
    if m.encoding == "encoded" and image_size is None and m.image_shape is None:
        raise StorageError(f"{ss.uri}: images have mixed sizes; pass image_size=<pixels> to stream them")
    shards = [{"path": p, "sha256": s["sha256"], "rows": s["rows"]}
              for p, s in zip(ss.shard_paths(split), ss.manifest.shards[split])]
    ds = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    ds.context.execution_options.preserve_order = True  # same seed -> same row order (this dataset only)
    read = {} if m.encoding == "raw" else _spread_decode(ds.context, len(shards))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"fs": ss.fs, "dataset": ss.uri, "verify": verify}, **read)
    return ds.map_batches(_decode_batch, batch_format="numpy", zero_copy_batch=True,
                          fn_kwargs={"shape": m.image_shape, "encoding": m.encoding, "image_size": image_size})


def _spread_decode(context, shards: int) -> dict:
    """Decoding a JPEG costs ~1000x reading it. Ray fuses read and decode into one task per shard by default,
    so decode ran on as many CPUs as there are shards (one, for a set of a few thousand images). Small blocks
    (this dataset only) cut a shard into many decode inputs, and a task pool of the read's own (sized to the
    shard count, so no limit in effect) stops the fusion, since Ray fuses only pools of equal size: decode
    tasks then take any shard's blocks on every CPU. -> map_batches kwargs of the read."""
    import ray.data

    context.target_max_block_size = ENCODED_BLOCK_BYTES
    return {"compute": ray.data.TaskPoolStrategy(size=max(1, shards))}


def iter_torch_batches(data, batch_size: int, device="cpu", *, drop_last: bool = True,
                       local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                       prefetch_batches: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ray Dataset or DataIterator (get_dataset_shard) -> (uint8 images, int64 labels) batches on device.

    Shuffling: either shuffle the Dataset per epoch (ds.random_shuffle(seed=...), a full global shuffle, what
    StreamingLoader does) or pass a local shuffle buffer + seed here (cheaper, only mixes nearby rows; see
    local_shuffle).
    """
    shuffle = bool(local_shuffle_buffer_size)
    batches = data.iter_torch_batches(batch_size=batch_size, device="cpu" if shuffle else device,
                                      drop_last=drop_last and not shuffle,
                                      dtypes={"image": torch.uint8, "label": torch.int64},
                                      prefetch_batches=prefetch_batches)
    pairs = ((b["image"], b["label"]) for b in batches)
    if not shuffle:
        yield from pairs
        return
    device = torch.device(device)
    for x, y in local_shuffle(pairs, batch_size, local_shuffle_buffer_size, local_shuffle_seed or 0, drop_last):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def local_shuffle(batches, batch_size: int, capacity: int, seed: int, drop_last: bool):
    """Seeded local shuffle of a stream of (images, labels) batches: once `capacity` samples are held, each batch
    out is drawn uniformly from them. A sample is copied into a free slot once and out once, nothing else moves.
    (Ray's own local shuffle buffer re-concatenates what it holds as it drains: for 150 KB images that cost
    more CPU than decoding them.)"""
    gen = torch.Generator().manual_seed(seed)
    cap = max(capacity, batch_size)
    xs = ys = None
    held: list[int] = []  # slots holding a sample, in arrival order
    free: list[int] = []

    def take(b: int):
        nonlocal held
        pick = torch.randperm(len(held), generator=gen)[:b].tolist()
        slots = [held[i] for i in pick]
        free.extend(slots)
        chosen = set(pick)
        held = [s for i, s in enumerate(held) if i not in chosen]
        index = torch.tensor(slots)
        return xs.index_select(0, index), ys.index_select(0, index)

    for x, y in batches:
        if xs is None or len(free) < len(x):  # the first batch, or one larger than any before
            size = max(cap + len(x), len(held) + len(x))
            grown = (torch.empty((size, *x.shape[1:]), dtype=x.dtype), torch.empty((size, *y.shape[1:]), dtype=y.dtype))
            if xs is not None:
                old = torch.tensor(held, dtype=torch.long)
                grown[0][:len(held)], grown[1][:len(held)] = xs.index_select(0, old), ys.index_select(0, old)
            held, free = list(range(len(held))), list(range(len(held), size))
            xs, ys = grown
        slots, free[:len(x)] = free[:len(x)], []
        for i, slot in enumerate(slots):  # a row at a time: index_copy_/index_put_ go element by element (7x slower)
            xs[slot].copy_(x[i])
        ys[slots] = y
        held.extend(slots)
        while len(held) >= cap:
            yield take(batch_size)
    while len(held) >= batch_size:
        yield take(batch_size)
    if held and not drop_last:
        yield take(len(held))


class StreamingLoader(_Timed):
    """Ray Data pipeline; each epoch is a seeded global random_shuffle of the split.

    Standalone multi-rank use reads every global batch and keeps this rank's slice (same samples as the
    resident loader's rule); under Ray Train prefer get_dataset_shard, which splits the reading itself.
    """

    def __init__(self, uri, split: str, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device="cpu", shuffle: bool = True, drop_last: bool = True, image_size: int | None = None):
        self.shardset = open_dataset(uri)
        n = self.shardset.manifest.splits.get(split)
        if n is None:
            raise StorageError(f"{self.shardset.uri}: no split {split!r}; available: "
                               f"{sorted(self.shardset.manifest.splits)}")
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
    if split not in ss.manifest.splits:
        raise StorageError(f"{ss.uri}: no split {split!r}; available: {sorted(ss.manifest.splits)}")
    _check(ss.manifest.splits[split], batch_size, rank, world_size, drop_last, f"split {split!r}")
    mode = loader_mode(ss, split, mode, image_size, max_resident_bytes)
    common = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                  shuffle=shuffle, drop_last=drop_last)
    if mode == "streaming":
        return StreamingLoader(ss, split, image_size=image_size, **common)
    x, y = ss.load_split(split, verify=verify, image_size=image_size)
    return ResidentLoader(x, y, **common)
