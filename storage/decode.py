"""Image decoding of shard rows: raw HWC uint8 bytes (fixed-size sets) and encoded JPEG/PNG files (imagefolder),
to uint8 tensors; one-line errors name the shard and the fix."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import simplejpeg
import torch

from storage.uri import StorageError


def decode_raw(images: pa.Array, shape: tuple[int, int, int], where: str) -> torch.Tensor:
    """Binary column of HWC uint8 rows -> uint8 tensor [N, C, H, W], zero-copy until the final permute."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks() if images.num_chunks != 1 else images.chunk(0)
    if not pa.types.is_binary(images.type) and not pa.types.is_large_binary(images.type):
        raise StorageError(f"{where}: column 'image' has type {images.type}, expected binary; prepare again")
    c, h, w = shape
    n, row = len(images), c * h * w
    if n == 0:
        return torch.empty(0, c, h, w, dtype=torch.uint8)
    odt = np.int64 if pa.types.is_large_binary(images.type) else np.int32
    offsets = np.frombuffer(images.buffers()[1], dtype=odt)[images.offset:images.offset + n + 1]
    if not np.all(np.diff(offsets) == row):
        bad = int(np.argmax(np.diff(offsets) != row))
        raise StorageError(f"{where}: row {bad} holds {int(offsets[bad + 1] - offsets[bad])} bytes but the "
                           f"manifest says images are {shape} ({row} bytes); manifest and shards disagree, "
                           "prepare the data again")
    values = np.frombuffer(images.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return torch.from_numpy(values.reshape(n, h, w, c).copy()).permute(0, 3, 1, 2).contiguous()


def decode_encoded(blobs, image_size: int | None, where: str) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 [N, 3, S, S]: shorter side resized to S then centre-cropped."""
    return torch.from_numpy(decode_encoded_hwc(blobs, image_size, where)).permute(0, 3, 1, 2).contiguous()


def decode_encoded_hwc(blobs, image_size: int | None, where: str) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 [N, S, S, 3] (HWC, the layout a decoder writes): shorter side resized to S,
    then centre-cropped. JPEGs go through simplejpeg (libjpeg-turbo, straight to HWC; torchvision's decoder
    permutes to CHW, and torch's antialiased uint8 resize is fastest on HWC memory); anything else through
    torchvision."""
    from torchvision.transforms.v2 import functional as F

    out = None
    for i, b in enumerate(blobs):
        img = _decode_hwc(b, f"{where}: row {i}")  # [H, W, 3]
        if image_size is not None:
            img = F.center_crop(F.resize(img.permute(2, 0, 1), image_size, antialias=True), [image_size] * 2)
            img = img.permute(1, 2, 0)
        if out is None:
            out = np.empty((len(blobs), *img.shape), np.uint8)
        elif img.shape != out.shape[1:]:
            raise StorageError(f"{where}: images have mixed sizes ({tuple(out.shape[1:3])} and "
                               f"{tuple(img.shape[:2])}); pass image_size=<pixels> to resize them to one size")
        torch.from_numpy(out[i]).copy_(img)
    return out if out is not None else np.empty((0, image_size or 0, image_size or 0, 3), np.uint8)


def _decode_hwc(blob: bytes, where: str) -> torch.Tensor:
    if blob[:3] == b"\xff\xd8\xff":  # JPEG; a CMYK one raises here and torchvision converts it below
        try:
            return torch.from_numpy(simplejpeg.decode_jpeg(blob, "RGB"))
        except ValueError:
            pass
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its decoders deprecated (-> torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                                mode=ImageReadMode.RGB).permute(1, 2, 0)
    except RuntimeError as e:
        raise StorageError(f"{where} is not a decodable image ({e}); prepare the data again") from e
