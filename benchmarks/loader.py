"""Resident loader + batched nfnet Augment vs a torchvision DataLoader doing the same kind of per-sample
augmentation (RandomCrop pad 4, flip, RandAugment at the same strength, ToDtype/Normalize; MixUp/CutMix per
batch on both sides). One epoch each over the same synthetic images; prints images/s and the ratio.

    python benchmarks/loader.py [--images 20000] [--batch-size 256] [--workers 2] [--device cpu]
"""

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import storage
from nfnet.augment import IMAGENET_MEAN, IMAGENET_STD, Augment


class PerSample(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Same CPU budget on both sides by default: as many intra-op threads as the baseline has worker processes.
    # On a loaded box extra OpenMP threads can stall (seen 10x slower at 2 threads under load): --threads 1.
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--root", default=None, help="where to write the synthetic shards (default: a temp dir)")
    args = ap.parse_args()
    args.threads = args.threads or max(1, args.workers)
    torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="nfnet-bench-")
    m = storage.prepare_dataset("synthetic", root, seed=0, n_train=args.images, n_val=1)
    dev = torch.device(args.device)
    aug = Augment(args.strength, m.num_classes).to(dev)
    print(f"{args.images} images {m.image_shape}, batch {args.batch_size}, {aug.extra_repr()}, device {dev}, "
          f"{args.threads} torch thread(s) in the main process, baseline workers {args.workers}")

    loader = storage.make_loader(m.uri, "train", batch_size=args.batch_size, seed=0, device=dev, mode="resident")
    g = torch.Generator(device=dev).manual_seed(0)
    for x, y in loader.epoch(0):  # warm-up epoch (allocator, kernels)
        aug(x, y, generator=g)
        break
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t, n = time.perf_counter(), 0
    for x, y in loader.epoch(1):
        xa, ya = aug(x, y, generator=g)
        n += len(ya)
    sync()
    ours = n / (time.perf_counter() - t)

    tf = v2.Compose([v2.RandomCrop(m.image_shape[1], padding=aug.pad), v2.RandomHorizontalFlip(),
                     v2.RandAugment(num_ops=aug.num_ops, magnitude=aug.magnitude),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images, labels = storage.open_dataset(m.uri).load_split("train")
    mix = v2.RandomChoice([v2.MixUp(alpha=aug.mixup_alpha or 0.2, num_classes=m.num_classes),
                           v2.CutMix(alpha=aug.cutmix_alpha or 1.0, num_classes=m.num_classes)])
    dl = DataLoader(PerSample(images, labels, tf), batch_size=args.batch_size, shuffle=True, drop_last=True,
                    num_workers=args.workers, persistent_workers=args.workers > 0,
                    pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(0))
    next(iter(dl))  # start the workers before timing
    sync()
    t, n = time.perf_counter(), 0
    for x, y in dl:
        xa, ya = mix(x.to(dev, non_blocking=True), y.to(dev))
        n += len(ya)
    sync()
    base = n / (time.perf_counter() - t)
    print(f"resident loader + batched Augment : {ours:10.0f} images/s")
    print(f"torchvision DataLoader ({args.workers} workers)  : {base:10.0f} images/s")
    print(f"RESULT loader ratio={ours / base:.1f} target>=5")


if __name__ == "__main__":
    main()
