"""Image grids and PNG files without an imaging library (zlib + the PNG spec)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .. import runfolder


def make_grid(images: np.ndarray, nrow: int = 8, pad: int = 2, value: int = 128) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` → one ``[rows·(H+pad)+pad, nrow·(W+pad)+pad, 3]`` image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
    n, h, w, _ = images.shape
    nrow = max(1, min(nrow, n))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), value, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour ×``factor`` (small images are easier to look at)."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of uint8 ``[H, W, 3]``."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` to ``path`` atomically (a temporary file, then a rename)."""
    return runfolder.atomic_write(path, encode_png(image))
