"""Encoded test images in the modes and containers real corpora hold and naive readers get wrong:
16-bit greyscale PNG, phone MPO (multi-picture JPEG) and EXIF-rotated JPEG. Each comes with the
upright 8-bit RGB pixels a correct reader must produce."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def png16(width: int = 40, height: int = 30) -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale ramp (PNG) and its expected RGB: value // 257 in each channel. Pillow's
    plain convert("RGB") clips it to white."""
    ramp = np.linspace(0, 65535, width * height).reshape(height, width).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    grey = np.rint(ramp / 257.0).astype(np.uint8)
    return buf.getvalue(), np.repeat(grey[:, :, None], 3, axis=2)


def mpo(width: int = 40, height: int = 30) -> tuple[bytes, tuple[int, int, int]]:
    """A two-frame MPO (red, then blue) and the colour of its first frame."""
    red, blue = Image.new("RGB", (width, height), (255, 0, 0)), Image.new("RGB", (width, height), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, "MPO", save_all=True, append_images=[blue])
    return buf.getvalue(), (255, 0, 0)


def exif_rotated(orientation: int = 6, width: int = 48, height: int = 24) -> tuple[bytes, tuple[int, int]]:
    """A JPEG stored sideways with an EXIF orientation tag, and the upright size: its left half
    red and right half blue as stored. Orientation 6 means "rotate 90 degrees clockwise to view",
    so the upright image is height x width with red on top."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return buf.getvalue(), upright
