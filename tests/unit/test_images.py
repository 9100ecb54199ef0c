"""Image validation reasons and the anyres token counts of the reference's worked examples."""

import io

import numpy as np
import pytest
from PIL import Image

from lladav.config import ImageLimits, VisionGeometry
from lladav.data.images import (BadImage, anyres_feature_shape, image_token_count, inspect_image,
                                select_best_resolution, grid_pinpoints)

SO400M = VisionGeometry()  # 384 px tiles, patch 14 -> 27x27, grid up to 6x6, anyres_max_4


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# digest §1.7: (W, H) -> (grid w x h, unpadded rows x cols after the cap, total tokens)
WORKED = [
    ((384, 384), (1, 1), (27, 27), 1485),
    ((336, 336), (1, 1), (27, 27), 1485),
    ((640, 480), (2, 2), (40, 54), 2929),
    ((480, 640), (2, 2), (54, 40), 2943),
    ((800, 600), (3, 2), (46, 62), 3627),
    ((1024, 768), (3, 2), (46, 62), 3627),
    ((1920, 1080), (5, 3), (40, 72), 3649),
    ((2304, 2304), (6, 6), (54, 54), 3699),
    ((300, 1000), (1, 3), (81, 25), 2835),
    ((100, 2000), (1, 6), (162, 9), 2349),
]


@pytest.mark.parametrize("size, grid, shape, tokens", WORKED)
def test_anyres_token_counts_match_worked_examples(size, grid, shape, tokens):
    gw, gh, rows, cols = anyres_feature_shape(*size, SO400M)
    assert (gw, gh) == grid
    assert (rows, cols) == shape
    assert image_token_count(*size, SO400M, "anyres_max_4") == tokens
    assert tokens == 729 + rows * (cols + 1)


def test_square_and_multi_image_counts():
    assert image_token_count(1024, 768, SO400M, "square") == 729
    assert image_token_count(1024, 768, SO400M, "anyres_max_4", n_images_in_sample=2) == 730


def test_best_resolution_prefers_less_waste_on_ties():
    # 100x100 fits fully (effective 10000) in every canvas: the smallest canvas wins.
    assert select_best_resolution(100, 100, grid_pinpoints(SO400M)) == (384, 384)


def test_pinpoints_are_i_major():
    assert grid_pinpoints(VisionGeometry(max_grid=2)) == [(384, 384), (384, 768), (768, 384), (768, 768)]


def test_valid_images_report_size_and_extension():
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    info = inspect_image(encode(img, "PNG"), ImageLimits())
    assert {k: v for k, v in info.__dict__.items() if k != "phash"} == {
        "width": 40, "height": 30, "ext": "png", "orientation": 1}
    # the perceptual hash of a flat image: the same for its JPEG copy
    assert info.phash == inspect_image(encode(img, "JPEG"), ImageLimits()).phash
    assert inspect_image(encode(img, "JPEG"), ImageLimits()).ext == "jpg"


def _bad(data: bytes, limits=ImageLimits()) -> str:
    with pytest.raises(BadImage) as err:
        inspect_image(data, limits)
    return err.value.code


def test_bad_images_are_refused_with_their_reason():
    jpeg = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    assert _bad(b"this is not an image") == "image_undecodable"
    assert _bad(jpeg[: len(jpeg) // 2]) == "image_truncated"
    assert _bad(encode(Image.new("RGB", (4, 64)), "PNG")) == "image_too_small"
    bomb = encode(Image.new("1", (5000, 5000)), "PNG")  # 25M pixels in a few KB
    assert len(bomb) < 100_000
    assert _bad(bomb, ImageLimits(max_pixels=10_000_000)) == "decompression_bomb"
    assert _bad(jpeg, ImageLimits(max_bytes=100)) == "image_too_large"


# ---- modes and containers of real corpora (tests/hostile_images.py) ----------------------------

def test_sixteen_bit_png_is_scaled_not_clipped_to_white():
    from hostile_images import png16
    from lladav.data.images import decode_rgb

    data, expected = png16()
    assert inspect_image(data, ImageLimits()).ext == "png"
    got = np.asarray(decode_rgb(data))
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert got.mean() < 200  # clipped, it would be 255 almost everywhere


def test_mpo_is_accepted_as_its_first_frame():
    from hostile_images import mpo
    from lladav.data.images import decode_rgb

    data, colour = mpo()
    info = inspect_image(data, ImageLimits())
    assert (info.ext, info.width, info.height) == ("jpg", 40, 30)
    assert decode_rgb(data).getpixel((20, 15)) == pytest.approx(colour, abs=3)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_to_size_and_pixels(orientation):
    from hostile_images import exif_rotated
    from lladav.data.images import decode_rgb, image_tiles

    data, upright = exif_rotated(orientation)
    info = inspect_image(data, ImageLimits())
    assert (info.width, info.height) == upright and info.orientation == orientation
    img = decode_rgb(data)
    assert img.size == upright
    # Stored: red left, blue right. 6 (turn clockwise): red on top; 8: red at the bottom;
    # 3 (half turn): red on the right.
    w, h = img.size
    probe = {6: (w // 2, 2), 8: (w // 2, h - 3), 3: (w - 3, h // 2)}[orientation]
    r, g, b = img.getpixel(probe)
    assert r > 200 and b < 60
    # The tiles the tower sees come from the upright image too.
    tiles = image_tiles(img, VisionGeometry(tile_size=32, patch_size=8, max_grid=2), "square")
    assert tiles.shape == (1, 3, 32, 32)


def test_decode_errors_carry_no_memory_address():
    with pytest.raises(BadImage) as err:
        inspect_image(b"not an image at all", ImageLimits())
    assert "0x" not in err.value.detail
