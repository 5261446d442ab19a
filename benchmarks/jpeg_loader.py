"""JPEG streaming throughput: the imagefolder streaming path (an ImageFolder prepared into encoded-JPEG Parquet
shards, streamed by storage.EpochStream exactly as studies/training/loop.py streams a training worker's epochs: one Ray
Data execution over all epochs, read + verify, decode, resize + crop to 224 px, seeded local shuffle of 8 batches,
uint8 batches) vs torchvision datasets.ImageFolder + DataLoader (PIL decode, RandomResizedCrop(224), ToTensor,
shuffle=True), on the same CPU budget: Ray is started with num_cpus=W, so at most W read/decode tasks run at once,
and the DataLoader has W worker processes; each side also has its one consuming process.

The random-resized crop of our path runs later, batched on the training device (nfnet.Augment); the loader
hands it 224 px uint8 images. Images are generated once with PIL (seeded, smooth colour fields, shapes and
grain, ~320-480 x 280-420 px, JPEG quality 90, ~44 KB each). Steady state: after one warm-up epoch per side
(worker processes started, imports and caches warm), rounds of --epochs epochs, one side then the other; a round's
rate is its images / seconds from its first batch to its end (the time to the first batch, once per training run,
is printed, not counted; every later epoch's start is counted). RESULT: the median over rounds of ours / theirs.
Shard preparation is one-time: timed and printed, not counted.

    python benchmarks/jpeg_loader.py [--images 3000] [--workers 2] [--epochs 4] [--rounds 3] [--smoke]
"""

import argparse
import io
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings

import _common  # noqa: F401  (puts the project on sys.path)
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import storage


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    # Natural-ish content so JPEG sizes are realistic: a smooth colour field, a few blurred shapes, fine grain.
    field = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(map(int, rng.integers(0, 256, 3))))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    grain = rng.normal(0, rng.uniform(4, 14), (h // 2 + 1, w // 2 + 1, 1)).repeat(2, 0).repeat(2, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def generate(folder: str, n: int, sizes: tuple[int, int, int, int], classes: int = 10, seed: int = 0) -> int:
    """n JPEGs in folder/<class>/ (ImageFolder layout), seeded; -> total bytes. A folder a previous run with
    --root filled is reused (same seed, same files)."""
    done = os.path.join(folder, f".done-{n}-{'-'.join(map(str, sizes))}")
    if os.path.exists(done):
        return int(open(done).read())
    rng, total = np.random.default_rng(seed), 0
    wmin, wmax, hmin, hmax = sizes
    for i in range(n):
        d = os.path.join(folder, f"c{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        blob = _jpeg(rng, int(rng.integers(wmin, wmax + 1)), int(rng.integers(hmin, hmax + 1)))
        with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
            f.write(blob)
        total += len(blob)
    with open(done, "w") as f:
        f.write(str(total))
    return total


def timed_round(epochs) -> tuple[int, float, float]:
    """Epochs back to back -> (images after the first batch, seconds from the first batch to the end, seconds to
    the first batch). The start-up (Ray Data's execution starting; DataLoader workers filling) is once per
    training run, so it is printed, not counted; every later epoch's own start is counted."""
    t0 = time.perf_counter()
    n, first = 0, None
    for batches in epochs:
        for x, _ in batches:
            if first is None:
                first = time.perf_counter()
                continue
            n += len(x)
    end = time.perf_counter()
    return n, end - first, first - t0


def ours(uri: str, image_size: int, batch_size: int, seed: int):
    """k -> k epochs of one storage.EpochStream (as studies/training/loop.py streams a run's epochs): one Ray Data
    execution, the next epoch decoded while this one drains."""
    def epochs(k: int):
        stream = storage.EpochStream(uri, "train", batch_size=batch_size, seed=seed, epochs=k, image_size=image_size)
        return [stream.epoch(e) for e in range(k)]
    return epochs


def torchvision(folder: str, files: set[str], image_size: int, batch_size: int, workers: int, seed: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.ToTensor()])
    ds = datasets.ImageFolder(folder, transform=tf)
    ds.samples = [s for s in ds.samples if s[0] in files]  # the same images as our train split
    ds.imgs = ds.samples
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                    generator=torch.Generator().manual_seed(seed))
    return lambda k: [dl] * k


def train_files(folder: str, seed: int) -> set[str]:
    from storage.sources import list_imagefolder

    return {fp for fp, _, _ in list_imagefolder(folder, seed).splits["train"]}


def batched_decode(uri: str, image_size: int, device: str, reps: int) -> float:
    """images/s of torchvision.io.decode_jpeg on a list of blobs (one batched call) + per-image resize/crop."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    ss = storage.open_dataset(uri)
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for i in range(len(ss.shard_paths("train")))
             for b in ss.read_shard("train", i).column("image").to_pylist()]
    dev = torch.device(device)

    def run():
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders deprecated (-> torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            imgs = decode_jpeg(blobs, device=dev)
        return torch.stack([F.center_crop(F.resize(x, image_size, antialias=True), [image_size] * 2) for x in imgs])

    run()  # CUDA context, nvjpeg handles
    times = [_common.elapsed(run, dev) for _ in range(reps)]
    return len(blobs) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2, help="CPU budget: Ray num_cpus = DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per side and round (one warm-up epoch each first)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, sides alternating; RESULT: median of the rounds' "
                    "ratios")
    ap.add_argument("--rows-per-shard", type=int, default=10000, help="prepare_dataset's default")
    ap.add_argument("--root", default=None, help="work dir for the JPEGs and shards (default: a temp dir, removed)")
    ap.add_argument("--smoke", action="store_true", help="a few dozen tiny images, one round of 2 epochs (< 60 s)")
    args = ap.parse_args()
    sizes = (320, 480, 280, 420)
    if args.smoke:
        args.images, args.batch_size, args.image_size, args.epochs, args.rounds = 48, 8, 32, 2, 1
        sizes = (40, 64, 36, 56)
    torch.set_num_threads(1)  # the consumer on each side is one process; decode parallelism is the budget
    root = args.root or tempfile.mkdtemp(prefix="jpeg-loader-")
    try:
        run(args, root, sizes)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: str, sizes) -> None:
    import ray
    import ray.data

    folder = os.path.join(root, "images")
    t = time.perf_counter()
    total = generate(folder, args.images, sizes)
    print(f"generated {args.images} JPEGs ({total / args.images / 1e3:.1f} KB mean, {sizes[0]}-{sizes[1]} x "
          f"{sizes[2]}-{sizes[3]} px) in {time.perf_counter() - t:.1f} s")
    shards = os.path.join(root, "shards")
    reused = os.path.isdir(shards)
    t = time.perf_counter()
    m = storage.prepare_dataset("imagefolder", shards, path=folder, seed=0, rows_per_shard=args.rows_per_shard,
                                progress_every=0)
    prep_s = time.perf_counter() - t
    n_all = sum(m.splits.values())
    print(f"prepare_dataset (one-time, not counted): {prep_s:.2f} s for {n_all} images ({n_all / prep_s:.0f} "
          f"images/s{', shards reused from --root' if reused else ''}); train split {m.splits['train']} rows in "
          f"{len(m.shards['train'])} shard(s)")

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-epoch execution-plan lines
        print(f"CPU budget: {args.workers} CPUs each side (Ray num_cpus={args.workers}: at most {args.workers} "
              f"read/decode tasks at once; DataLoader num_workers={args.workers}) + 1 consuming process, "
              f"{os.cpu_count()} cores on the machine; batch {args.batch_size}, {args.image_size} px")
        sides = {"ours": ours(m.uri, args.image_size, args.batch_size, 0),
                 "torchvision": torchvision(folder, train_files(folder, 0), args.image_size, args.batch_size,
                                            args.workers, 0)}
        rates, fills, cpu = compare(sides, args.epochs, args.rounds)
    finally:
        ray.shutdown()
    for name, label in (("ours", "Ray Data streaming (encoded shards)"),
                        ("torchvision", f"torchvision ImageFolder+DataLoader ({args.workers} workers)")):
        r = rates[name]
        per = f"; {statistics.median(cpu[name]) * 1e3:.2f} CPU ms/image" if cpu[name] else ""
        print(f"{label:<52}: {statistics.median(r):8.0f} images/s (rounds {', '.join(f'{x:.0f}' for x in r)}; "
              f"first batch after {statistics.median(fills[name]):.2f} s{per})")
    gpu_decode(m.uri, args)
    ratio = statistics.median(a / b for a, b in zip(rates["ours"], rates["torchvision"]))  # paired by round
    print(f"RESULT jpeg_loader ratio={ratio:.2f} target>=1.5")


def _proc_table() -> dict[int, tuple[int, float, bytes]]:
    """pid -> (parent pid, CPU seconds used, command line), from /proc."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f, open(f"/proc/{d}/cmdline", "rb") as c:
                stat, cmd = f.read(), c.read()
        except OSError:
            continue  # exited while we looked
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def cpu_seconds() -> dict[str, float]:
    """CPU seconds so far of this process plus its DataLoader workers (forks: this command line) -> 'torchvision',
    plus every other descendant (Ray's raylet, GCS and workers) -> 'ours'. Wall-clock rates on a shared
    machine follow its load; the CPU time each side spends per image does not."""
    if not os.path.isdir("/proc"):
        return {}
    table, me = _proc_table(), os.getpid()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    mine = {"ours": table[me][1], "torchvision": table[me][1]}
    stack = list(kids.get(me, []))
    while stack:
        pid = stack.pop()
        stack += kids.get(pid, [])
        forked = table[pid][0] == me and table[pid][2] == table[me][2]
        mine["torchvision" if forked else "ours"] += table[pid][1]
    return mine


def compare(sides: dict, epochs: int, rounds: int) -> tuple[dict, dict, dict]:
    """-> per side and round: images/s, seconds to the first batch, CPU seconds per image. A round runs `epochs`
    epochs of one side, then of the other: an EpochStream decodes ahead, so the two sides' epochs must not
    interleave (ours would decode on CPU time the other side is timed on)."""
    for epochs_of in sides.values():
        timed_round(epochs_of(1))  # warm-up: worker processes, imports, caches
    rates, fills, cpu = ({k: [] for k in sides} for _ in range(3))
    for _ in range(rounds):
        for name, epochs_of in sides.items():
            before = cpu_seconds()
            n, secs, fill = timed_round(epochs_of(epochs))
            after = cpu_seconds()
            rates[name].append(n / secs)
            fills[name].append(fill)
            if name in after:
                cpu[name].append((after[name] - before[name]) / n)
    return rates, fills, cpu


def gpu_decode(uri: str, args) -> None:
    if torch.cuda.is_available():
        rate = batched_decode(uri, args.image_size, "cuda", max(3, args.epochs))
        print(f"GPU batched decode_jpeg(device='cuda') + resize/crop ({torch.cuda.get_device_name()}): "
              f"{rate:8.0f} images/s")
    elif args.smoke:
        rate = batched_decode(uri, args.image_size, "cpu", 1)  # rehearse the code path the GPU run takes
        print(f"GPU batched decode: NOT MEASURED (no CUDA); the same path on cpu: {rate:.0f} images/s")
    else:
        print("GPU batched decode: NOT MEASURED (no CUDA on this machine)")


if __name__ == "__main__":
    main()
