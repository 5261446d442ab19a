"""Batch augmentation on any device, one `strength` knob for RandAugment + MixUp + CutMix (NFNet recipe).

Order per batch: random crop -> horizontal flip -> RandAugment (uint8) -> float + normalize -> MixUp on the
first half / CutMix on the second half of the batch -> soft labels.

torchvision's v2 transforms draw one set of random parameters per call, i.e. per batch. To get per-sample
variety at batch speed we apply RandAugment to `randaug_chunks` chunks of the batch, each with its own ops.
Crops and flips are drawn per sample. All randomness comes from the given generator (the torchvision
transforms run under a forked global RNG seeded from it), so a fixed generator seed gives identical output.

Crops at a set `image_size` (image folders: the loaders hand over images already decoded to image_size x
image_size, short side resized then centre-cropped, so every crop below is an upsampling):

- Eval view: resize the short side to round(image_size / crop_fraction) (0.875: 256 -> 224) and centre-crop
  image_size, so the net is evaluated on the same share of the image (0.875 of the side) at every size. The
  old fixed +32 px resize was right at 224 px (256) but at 16 px it resized to 48 and showed the centre third
  of the image, zoomed 3x: 11 % of the image's area, smaller than 97 % of the training crops, and always
  centred (measured: val top-1 0.49 where the same net scored 0.78 on its augmented training batches).
- Training crop, defined relative to that view: an area in [min_crop_area, 1] of the eval view's area, an
  aspect ratio in [3/4, 4/3] (log-uniform), a position tx, ty in [-1, 1] (0: concentric with the eval view,
  +-1: against the image's edge, so the crop may still reach the border the eval view leaves out), then a
  50 % horizontal flip. At area 1, ratio 1, tx = ty = 0, unflipped, the crop *is* the eval view:
  `eval_window` repeats torchvision's resize-then-centre-crop integer arithmetic (also the uneven margins
  when the resize leaves an odd number of pixels, e.g. 64 -> 73), and `grid_sample` (bilinear,
  align_corners=False) on that window samples the input at the very points the upsampling resize does, so
  the two agree to +-1 uint8 level at 16, 32, 64 and 224 px (tests/test_augment.py, white-noise images).
  An input larger than the resize would be downsampled: eval antialiases there, the crop does not.
- Small images, `default_min_crop_area`: the Inception crop (area 8-100 %, drawn at every strength, then
  flips) is at its smallest a 4.5 px patch blown up 3.5x at 16 px (9 px at 32), and its uniform area draw
  makes half the crops smaller than 54 % of the area (under 12 px of 16): patches too small to hold the
  object, blurred by the upsampling, that eval never shows. Measured on a 10-class image folder of drawn
  shapes/textures (2,000 PNGs of 48-96 px, split 1,600 / 400; studies/train.py, nf_resnet_cifar width 16
  depth 1, batch 64, base lr 0.4, strength 0), val top-1 by smallest crop area (mean over seeds):

  | px | epochs | seeds | 0.08 | 0.25 | 0.5 | 1 | before: +32 px eval, 8 % of the image |
  |---|---|---|---|---|---|---|---|
  | 16 | 30 | 3 | 0.779 | 0.821 | 0.872 | 0.891 | 0.485 |
  | 16 | 90 | 2 | 0.916 | 0.929 | 0.953 | 0.964 | |
  | 32 | 30 | 3 | 0.857 | 0.887 | 0.923 | 0.953 | 0.811 |
  | 32 | 90 | 1 | 0.938 | 0.968 | 0.973 | 0.978 | |
  | 64 | 30 | 1 | 0.825 | 0.880 | | 0.907 | 0.835 |

  Every smaller crop lost accuracy at 16, 32 and 64 px, with 3x the epochs too: up to 64 px the crop keeps
  the eval view's scale (area 1: translation, aspect 3/4-4/3 and flips remain). From 224 px on it is
  Inception's 8 % (not measured here: the NFNet/ImageNet recipe); between, log-log linear, which keeps the
  smallest crop at about 56 input pixels a side, a whole 64 px eval view. Pad-and-crop (CIFAR, pad
  image_size / 8, eval on the whole image) gave 0.848 at 16 px and 0.907 at 32 px: below area 1.
  The eval view is the *largest* training crop; an Inception draw zooms in 1.56x on average, so with 8-100 %
  the net trains on larger-looking objects than it is tested on (Touvron et al. 2019, "FixRes"): at 64 px
  the matched eval with 8-100 % crops (0.825) did not beat the old zoomed-in eval (0.835); area 1 did (0.907).

At `image_size=None` (fixed-size data at its own resolution: CIFAR, the synthetic laptop set) training uses
pad-and-crop and eval the image itself, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE_FREE_MAX_SIZE = 64  # up to this size the training crop keeps the eval view's scale (min area 1)
INCEPTION_MIN_SIZE, INCEPTION_MIN_AREA = 224, 0.08  # from this size on, Inception's 8-100 %


def default_min_crop_area(image_size: int) -> float:
    """Smallest training crop area (a fraction of the eval view's area) at this image size: 1 up to 64 px
    (measured: any smaller crop lost val accuracy at 16, 32 and 64 px), Inception's 0.08 from 224 px up (the
    NFNet/ImageNet recipe), log-log linear between, where area ~ (64 / image_size)^2.02: the smallest crop keeps
    about the 56 input pixels a side of a whole 64 px eval view. Evidence in the module docstring."""
    if image_size <= SCALE_FREE_MAX_SIZE:
        return 1.0
    if image_size >= INCEPTION_MIN_SIZE:
        return INCEPTION_MIN_AREA
    t = math.log(image_size / SCALE_FREE_MAX_SIZE) / math.log(INCEPTION_MIN_SIZE / SCALE_FREE_MAX_SIZE)
    return INCEPTION_MIN_AREA ** t


class Augment(nn.Module):
    def __init__(self, strength: float, num_classes: int, image_size: int | None = None, pad: int = 4,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 randaug_chunks: int = 8, crop_fraction: float = 0.875, min_crop_area: float | None = None):
        super().__init__()
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1] (the eval view's share of the image side, e.g. "
                             f"0.875: 256 -> 224), got {crop_fraction}")
        if min_crop_area is not None and not 0.0 < min_crop_area <= 1.0:
            raise ValueError(f"min_crop_area must be in (0, 1] or None (by image size), got {min_crop_area}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean/std need equal lengths and std > 0, got {mean}, {std}")
        self.strength = float(strength)
        self.num_classes = num_classes
        self.image_size = image_size
        self.pad = pad
        self.crop_fraction = float(crop_fraction)
        self.resize_size = None if image_size is None else round(image_size / self.crop_fraction)
        self.min_crop_area = float(min_crop_area if min_crop_area is not None
                                   else default_min_crop_area(image_size) if image_size is not None else 1.0)
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
                f"image_size={self.image_size}, crop_fraction={self.crop_fraction}, "
                f"min_crop_area={self.min_crop_area:.3g}")

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 batch [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {self.mean.shape[1]}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # (x/255 − mean)/std as one scale and one shift, in place on the fresh float copy.
        return images.float().mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)

    def eval_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic: (when image_size is set) resize the short side to round(image_size / crop_fraction) and
        centre-crop image_size, the training crop's full-area view; then normalize."""
        self._check(images)
        if self.image_size is not None:
            from torchvision.transforms import v2  # lazily: importing torchvision costs ~2 s

            images = v2.functional.resize(images, [self.resize_size], antialias=True)
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

    def eval_window(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The region of a height x width input that `eval_transform` shows, in input pixels (pixel k spans
        [k, k + 1]): (top, left, crop height, crop width). Same integer arithmetic as torchvision's resize of the
        short side to `resize_size` followed by its centre crop, so the training crop can be placed on it exactly."""
        size, short = self.image_size, self.resize_size
        if height <= width:
            new_h, new_w = short, int(short * width / height)
        else:
            new_h, new_w = int(short * height / width), short
        sy, sx = height / new_h, width / new_w  # input pixels per resized pixel
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return top * sy, left * sx, size * sy, size * sx

    def crop_views(self, images: torch.Tensor, area: torch.Tensor, ratio: torch.Tensor, tx: torch.Tensor,
                   ty: torch.Tensor) -> torch.Tensor:
        """Resampled crops, one per sample: `area` (fraction of the eval view's area), `ratio` (width/height)
        and the position tx, ty in [-1, 1] (0: concentric with the eval view, +-1: against the image's edges).
        area = ratio = 1, tx = ty = 0 is the eval view itself (to interpolation), at every image size."""
        n, _, h, w = images.shape
        top, left, win_h, win_w = self.eval_window(h, w)
        cw = ((area * ratio).sqrt() * win_w).clamp(max=w)  # crop size in input pixels
        ch = ((area / ratio).sqrt() * win_h).clamp(max=h)
        cx = self._place(left + win_w / 2, cw, w, tx)  # crop centre in input pixels
        cy = self._place(top + win_h / 2, ch, h, ty)
        # affine_grid (align_corners=False) maps output [-1, 1] to input [-1, 1] = input pixel edges [0, size].
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw / w, 2 * cx / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch / h, 2 * cy / h - 1
        size = (n, images.shape[1], self.image_size, self.image_size)
        grid = F.affine_grid(theta.to(images.device), list(size), align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _place(centre: float, crop: torch.Tensor, side: int, t: torch.Tensor) -> torch.Tensor:
        # t = 0 keeps the crop concentric with the eval view, t = -1 / +1 puts it against the low / high edge.
        lo, hi = crop / 2, side - crop / 2
        c0 = torch.minimum(torch.maximum(torch.full_like(crop, centre), lo), hi)
        return torch.where(t < 0, c0 + t * (c0 - lo), c0 + t * (hi - c0))

    def _random_resized_crop(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Per sample: area uniform in [min_crop_area, 1] of the eval view, aspect log-uniform in [3/4, 4/3],
        # position uniform in [-1, 1] per axis; one batched grid_sample.
        n = images.shape[0]
        area = torch.empty(n).uniform_(self.min_crop_area, 1.0, generator=gen)
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        tx = torch.rand(n, generator=gen) * 2 - 1
        ty = torch.rand(n, generator=gen) * 2 - 1
        return self.crop_views(images, area, log_ratio.exp(), tx, ty)

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
