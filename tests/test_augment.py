import math

import pytest
import torch
import torch.nn.functional as F

from nfnet.augment import Augment


def batch(n=16, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return images, labels


def unnormalize(aug, x):
    return (x * aug.std + aug.mean).mul(255).round().to(torch.int64)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_shapes_and_types(strength):
    aug = Augment(strength, num_classes=10)
    images, labels = batch()
    x, y = aug(images, labels, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(16))


def test_random_resized_crop_size():
    aug = Augment(0.5, num_classes=10, image_size=24)
    images, labels = batch(n=8, size=40)
    x, _ = aug(images, labels, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 24, 24)
    assert aug.eval_transform(images).shape == (8, 3, 24, 24)


def test_deterministic_given_generator_seed():
    aug = Augment(1.0, num_classes=10)
    images, labels = batch()
    x1, y1 = aug(images, labels, generator=torch.Generator().manual_seed(7))
    x2, y2 = aug(images, labels, generator=torch.Generator().manual_seed(7))
    x3, _ = aug(images, labels, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_strength_zero_is_only_crop_and_flip():
    aug = Augment(0.0, num_classes=10, pad=4)
    images, labels = batch(n=12)
    x, y = aug(images, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, F.one_hot(labels, 10).float())
    pixels = unnormalize(aug, x)
    padded = F.pad(images.to(torch.int64), (4, 4, 4, 4))
    flips_seen = set()
    for i in range(12):
        matches = [(dy, dx, flip) for flip in (False, True) for dy in range(9) for dx in range(9)
                   if torch.equal(pixels[i], (padded[i].flip(-1) if flip else padded[i])[:, dy:dy + 32, dx:dx + 32])]
        assert matches, f"sample {i} is not a shifted/flipped copy of its input"
        flips_seen.add(matches[0][2])
    assert flips_seen == {False, True}


def test_strength_one_mixes_labels():
    aug = Augment(1.0, num_classes=10)
    images, labels = batch(n=32)
    _, y = aug(images, labels, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(y.sum(1), torch.ones(32))
    assert ((y > 0) & (y < 1)).any(dim=1).sum() >= 16  # most rows are genuine mixtures of two classes
    assert aug.num_ops == 4 and aug.magnitude == 15


def test_eval_mode_and_eval_transform_are_deterministic():
    aug = Augment(1.0, num_classes=10).eval()
    images, labels = batch()
    x, y = aug(images, labels)
    torch.testing.assert_close(x, aug.eval_transform(images))
    expected = (images.float() / 255 - aug.mean) / aug.std
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, F.one_hot(labels, 10).float())


def test_bad_inputs():
    with pytest.raises(ValueError, match="strength"):
        Augment(1.5, num_classes=10)
    with pytest.raises(ValueError, match="strength"):
        Augment(-0.1, num_classes=10)
    aug = Augment(0.5, num_classes=10)
    images, labels = batch()
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        aug(images, labels[:3])


# ------------------------------------------------------------------ eval crop = the training crop's full-area view

def noise(size, n=4, seed=0, height=None):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height or size, size), dtype=torch.uint8, generator=gen)


def full_area_view(aug, images):
    ones, zeros = torch.ones(len(images)), torch.zeros(len(images))
    return aug.crop_views(images, area=ones, ratio=ones, tx=zeros, ty=zeros)


@pytest.mark.parametrize("size", [16, 32, 64, 224])
@pytest.mark.parametrize("extra", [0, 7], ids=["square", "wider"])
def test_full_area_train_view_is_the_eval_view(size, extra):
    # Inputs at image_size, as the image-folder loaders deliver them (odd widths: uneven centre-crop margins).
    # White noise is the worst case for interpolation; the two paths may differ only by uint8 rounding.
    aug = Augment(0.0, num_classes=10, image_size=size)
    images = noise(size + extra, height=size)
    train = full_area_view(aug, images).to(torch.int64)
    evaluated = unnormalize(aug, aug.eval_transform(images))
    assert train.shape == evaluated.shape == (4, 3, size, size)
    diff = (train - evaluated).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.35, (diff.max(), diff.float().mean())


@pytest.mark.parametrize("size", [16, 32, 64, 224])
def test_eval_view_field_of_view_is_the_crop_fraction_at_every_size(size):
    aug = Augment(0.0, num_classes=10, image_size=size)
    assert aug.resize_size == round(size / 0.875)
    top, left, h, w = aug.eval_window(size, size)
    assert h == w and abs(h / size - 0.875) < 0.02  # not the centre third (16 px) the old +32 px resize showed
    assert abs(top + h / 2 - size / 2) <= 0.5 and abs(left + w / 2 - size / 2) <= 0.5


@pytest.mark.parametrize("shape", [(224, 224), (300, 400), (401, 299)])
def test_crop_fraction_matches_torchvision_resize_then_center_crop(shape):
    from torchvision.transforms import v2

    aug = Augment(0.0, num_classes=10, image_size=224)  # 0.875: 256 -> 224
    assert aug.resize_size == 256
    images = noise(shape[1], n=2, height=shape[0])
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(images)
    torch.testing.assert_close(aug.eval_transform(images), aug.normalize(reference))


def test_crop_fraction_argument():
    images = noise(32, n=2)
    whole = Augment(0.0, num_classes=10, image_size=32, crop_fraction=1.0)
    torch.testing.assert_close(whole.eval_transform(images), whole.normalize(images))  # nothing cropped
    half = Augment(0.0, num_classes=10, image_size=32, crop_fraction=0.5)
    assert half.resize_size == 64
    top, left, h, w = half.eval_window(32, 32)
    assert (top, left, h, w) == (8.0, 8.0, 16.0, 16.0)  # the central half of the side
    assert abs(unnormalize(half, half.eval_transform(images)) - full_area_view(half, images)).max() <= 1


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, 2.0, float("nan")])
def test_bad_crop_fraction_is_refused(bad):
    with pytest.raises(ValueError, match=r"crop_fraction must be in \(0, 1\]"):
        Augment(0.0, num_classes=10, image_size=32, crop_fraction=bad)
    with pytest.raises(ValueError, match="min_crop_area"):
        Augment(0.0, num_classes=10, image_size=32, min_crop_area=bad if bad != 1.01 else 1.5)


def test_crop_position_reaches_the_image_edges():
    # A ramp image (value = 4 * column) read back through crops placed with tx = -1 / 0 / +1.
    size = 64
    ramp = (torch.arange(size) * 4).to(torch.uint8).expand(1, 3, size, size).contiguous()
    aug = Augment(0.0, num_classes=10, image_size=size)
    _, win_left, _, win = aug.eval_window(size, size)  # 73 px resize: the centre crop's margins are 4 and 5
    area = torch.tensor([0.25])
    crop = win * 0.5  # sqrt(0.25) of the eval view's side
    for t, left in ((-1.0, 0.0), (1.0, size - crop), (0.0, win_left + win / 2 - crop / 2)):
        row = aug.crop_views(ramp, area, torch.ones(1), torch.tensor([t]), torch.zeros(1))[0, 0, 0].float()
        centres = left + (torch.arange(size) + 0.5) * crop / size - 0.5  # source column of each output column
        expected = (centres.clamp(0, size - 1) * 4).round()
        assert (row - expected).abs().max() <= 1, (t, row[:4], expected[:4])


def test_small_image_rule_sets_the_smallest_crop():
    from nfnet.augment import default_min_crop_area

    sizes = [8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 224, 512]
    areas = [default_min_crop_area(s) for s in sizes]
    assert all(0.0 < a <= 1.0 for a in areas)
    assert areas == sorted(areas, reverse=True)  # the smaller the image, the larger the smallest crop
    assert all(default_min_crop_area(s) == 1.0 for s in (8, 16, 32, 64))  # translation, aspect and flips only
    assert default_min_crop_area(224) == pytest.approx(0.08) and default_min_crop_area(512) == 0.08  # Inception's
    for size in (80, 96, 128, 160, 192):  # between: the smallest crop keeps ~ a whole 64 px eval view (56 px)
        aug = Augment(0.0, num_classes=10, image_size=size)
        smallest_side = math.sqrt(aug.min_crop_area) * aug.eval_window(size, size)[2]
        assert 54 < smallest_side < 58, (size, smallest_side)
    assert Augment(0.0, num_classes=10, image_size=16).min_crop_area == 1.0
    assert Augment(0.0, num_classes=10, image_size=16, min_crop_area=0.3).min_crop_area == 0.3


def test_small_image_crops_keep_the_eval_scale():
    # At 16 px every training crop (strength 0) is the eval view up to a shift, the aspect jitter and a flip:
    # never a 4 px patch blown up 4x. A smooth ramp's value range across a row tells the crop's width.
    size = 16
    ramp = (torch.arange(size) * 16).to(torch.uint8).expand(64, 3, size, size).contiguous()
    aug = Augment(0.0, num_classes=10, image_size=size)
    x, _ = aug(ramp, torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    row = unnormalize(aug, x)[:, 0, size // 2]
    span = (row.amax(1) - row.amin(1)).float() / 16  # input columns the crop covers, about its width - 1
    eval_span = aug.eval_window(size, size)[3] * (size - 1) / size
    assert span.min() > eval_span * math.sqrt(3 / 4) - 0.5  # at most the narrowest aspect at full area
    small = Augment(0.0, num_classes=10, image_size=size, min_crop_area=0.08)  # Inception's range, for contrast
    xs, _ = small(ramp, torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    rows = unnormalize(small, xs)[:, 0, size // 2]
    assert ((rows.amax(1) - rows.amin(1)).float() / 16).min() < 6  # patches of a few pixels


@pytest.mark.parametrize("size", [16, 32, 224])
def test_random_crops_draw_from_the_documented_ranges(size, monkeypatch):
    aug = Augment(0.0, num_classes=10, image_size=size)
    seen = {}

    def record(images, area, ratio, tx, ty):
        seen.update(area=area, ratio=ratio, tx=tx, ty=ty)
        return images

    monkeypatch.setattr(aug, "crop_views", record)
    aug._random_resized_crop(noise(size, n=512), torch.Generator().manual_seed(0))
    assert seen["area"].min() >= aug.min_crop_area and seen["area"].max() <= 1.0
    assert seen["area"].min() < aug.min_crop_area + 0.05 and seen["area"].max() > 0.95  # the whole range is used
    assert seen["ratio"].min() >= 3 / 4 - 1e-6 and seen["ratio"].max() <= 4 / 3 + 1e-6
    assert seen["tx"].abs().max() <= 1 and seen["ty"].abs().max() <= 1


def test_random_resized_crop_is_deterministic_given_generator():
    aug = Augment(0.5, num_classes=10, image_size=16)
    images, labels = batch(n=8, size=16)
    x1, y1 = aug(images, labels, generator=torch.Generator().manual_seed(5))
    x2, y2 = aug(images, labels, generator=torch.Generator().manual_seed(5))
    x3, _ = aug(images, labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
