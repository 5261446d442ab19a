import pytest
import torch
import torch.nn.functional as F

from nfnet.augment import Augment

torch.set_num_threads(2)


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
