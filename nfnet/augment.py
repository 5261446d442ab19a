"""Batch augmentation on any device, one `strength` knob for RandAugment + MixUp + CutMix (NFNet recipe).

Order per batch: random crop -> horizontal flip -> RandAugment (uint8) -> float + normalize -> MixUp on the
first half / CutMix on the second half of the batch -> soft labels.

torchvision's v2 transforms draw one set of random parameters per call, i.e. per batch. To get per-sample
variety at batch speed we apply RandAugment to `randaug_chunks` chunks of the batch, each with its own ops.
Crops and flips are drawn per sample. All randomness comes from the given generator (the torchvision
transforms run under a forked global RNG seeded from it), so a fixed generator seed gives identical output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Augment(nn.Module):
    def __init__(self, strength: float, num_classes: int, image_size: int | None = None, pad: int = 4,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 randaug_chunks: int = 8):
        super().__init__()
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean/std need equal lengths and std > 0, got {mean}, {std}")
        self.strength = float(strength)
        self.num_classes = num_classes
        self.image_size = image_size
        self.pad = pad
        self.randaug_chunks = max(1, randaug_chunks)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # Strength 1 = the big NFNets' setting: 4 RandAugment layers at magnitude 15, MixUp α 0.2, CutMix α 1.
        self.num_ops = round(4 * self.strength)
        self.magnitude = round(15 * self.strength)
        self.mixup_alpha = 0.2 * self.strength
        self.cutmix_alpha = 1.0 * self.strength

    def extra_repr(self) -> str:
        return (f"strength={self.strength}, randaug=({self.num_ops}, {self.magnitude}), "
                f"mixup_alpha={self.mixup_alpha:.3f}, cutmix_alpha={self.cutmix_alpha:.3f}, "
                f"image_size={self.image_size}")

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 batch [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {self.mean.shape[1]}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # (x/255 − mean)/std as one scale and one shift, in place on the fresh float copy.
        return images.float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic: resize to image_size+32 and centre-crop (when image_size is set), then normalize."""
        self._check(images)
        if self.image_size is not None:
            from torchvision.transforms import v2  # lazily: importing torchvision costs ~2 s

            images = v2.functional.resize(images, [self.image_size + 32], antialias=True)
            images = v2.functional.center_crop(images, [self.image_size, self.image_size])
        return self.normalize(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(images)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        if not self.training:
            return self.eval_transform(images), F.one_hot(labels, self.num_classes).float()
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        x = self._crop(images, generator)
        x = self._flip(x, generator)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self._randaugment(x)
            x = self.normalize(x)
            x, y = self._mix(x, labels)
        return x, y

    def _crop(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        if self.image_size is not None:
            return self._random_resized_crop(images, gen)
        if self.pad == 0:
            return images
        p, dev = self.pad, images.device
        padded = F.pad(images, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(dev)
        # Every possible crop is a strided view [N, C, 2p+1, 2p+1, H, W]; one indexing copy picks each sample's.
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)
        return windows[torch.arange(n, device=dev), :, oy, ox]

    def _random_resized_crop(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Inception-style crop (area 8-100 %, aspect 3/4-4/3) per sample, one batched grid_sample.
        n = images.shape[0]
        area = torch.empty(n).uniform_(0.08, 1.0, generator=gen)
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = log_ratio.exp()
        cw = (area * ratio).sqrt().clamp(max=1.0)  # crop size as a fraction of the image side
        ch = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - cw)  # centre in [-1, 1] keeping the crop inside
        cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - ch)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
        size = (n, images.shape[1], self.image_size, self.image_size)
        grid = F.affine_grid(theta.to(images.device), list(size), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def _flip(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flip = (torch.rand(images.shape[0], generator=gen) < 0.5).to(images.device)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)

    def _randaugment(self, images: torch.Tensor) -> torch.Tensor:
        if self.num_ops == 0:
            return images
        from torchvision.transforms import v2

        op = v2.RandAugment(num_ops=self.num_ops, magnitude=self.magnitude)
        chunks = images.chunk(min(self.randaug_chunks, images.shape[0]))
        return torch.cat([op(c) for c in chunks])

    def _mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup_alpha == 0.0 or x.shape[0] < 2:
            return x, F.one_hot(labels, self.num_classes).float()
        from torchvision.transforms import v2

        # NFNet recipe: MixUp on one half of the batch, CutMix on the other.
        half = x.shape[0] // 2
        xa, ya = v2.MixUp(alpha=self.mixup_alpha, num_classes=self.num_classes)(x[:half], labels[:half])
        if x.shape[0] - half >= 2:
            xb, yb = v2.CutMix(alpha=self.cutmix_alpha, num_classes=self.num_classes)(x[half:], labels[half:])
        else:
            xb, yb = x[half:], F.one_hot(labels[half:], self.num_classes).float()
        return torch.cat([xa, xb]), torch.cat([ya, yb]).float()
