"""Image checks and anyres geometry: is an image safe to train on, and how many tokens it becomes.

Owns: decoding and validating encoded images (format, truncation, decompression bombs, minimum
side, size on disk) and the anyres rules that fix an image's feature-token count from its size
alone (lladav_reference.md "Images"; digest §1.7 has the worked examples these functions are
tested against), and the normalised pixel tiles the vision tower sees. Does not own: reading
bytes from storage, or assembling the tower's features (model/lladav.py).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from lladav.config import ImageLimits, VisionGeometry
from lladav.data import RecordError

# Truncated files must fail, never load half-grey (the reference sets this to True).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# PIL format name -> file extension used for the shard member (webdataset decodes by extension).
# MPO (phone cameras' multi-picture JPEG) starts with an ordinary JPEG: it is stored as .jpg and
# every reader sees its first frame.
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
               "BMP": "bmp", "TIFF": "tiff"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # PIL's reprs carry memory addresses
EXIF_ORIENTATION = 0x0112


class BadImage(RecordError):
    """An image that must not be trained on; `code` is the reject reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int        # as the model sees it: after the EXIF orientation is applied
    height: int
    ext: str          # shard member extension: jpg, png, ...
    orientation: int = 1  # the file's EXIF orientation (1 = upright); applied when decoded
    phash: int = 0        # 128-bit perceptual hash of the upright image (`perceptual_hash`)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or invalid."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a corrupt EXIF block must not cost the image; it is read upright
        return 1
    return value if 1 <= value <= 8 else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as the vision tower must see it: EXIF orientation applied, first frame of a
    multi-frame file, and 8-bit RGB with each mode's range mapped correctly.

    Pillow's plain `convert("RGB")` clips 16-bit greyscale ("I;16", "I") at 255, so an ordinary
    16-bit PNG would train as a white image; here 16-bit values are scaled by 1/257 and float
    images ("F") are read as 0..1.
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # "I" holds 32-bit ints; PNG decodes 16-bit greyscale to it. Anything above 255 is 16-bit.
        scale = 257.0 if img.mode != "I" or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


_PHASH_SIDE = 128  # images are box-reduced to about this before hashing


def perceptual_hash(img: Image.Image) -> int:
    """A 128-bit perceptual hash of an (upright, RGB) image, as an int: imagehash's 64-bit DCT
    hash (phash) in the high half, its 64-bit difference hash (dhash) in the low half. Resized,
    re-encoded or slightly cropped copies land a few bits apart in both (data/near_dedup.py).

    Two because one is not enough: among 1,000 distinct generated images one pair was 6 phash
    bits apart (at 8 a resized copy still is, a 2% crop often is not), while no distinct pair was
    within 16 bits on both halves at once (tests/unit/test_near_dedup.py).
    A large image is box-reduced by an integer factor first, to a shorter side of at least
    _PHASH_SIDE pixels: the hashes' own Lanczos resizes read every pixel (~40 ms on a
    12-megapixel photo), the reduction ~2 ms, and the thumbnails they hash stay nearly the same."""
    import imagehash

    factor = min(img.size) // _PHASH_SIDE
    if factor >= 2:
        img = img.reduce(factor)
    return (int(str(imagehash.phash(img)), 16) << 64) | int(str(imagehash.dhash(img)), 16)


def hash_halves(value: int) -> tuple[int, int]:
    """(phash, dhash) of a `perceptual_hash`."""
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> the upright 8-bit RGB image the model sees (see `to_rgb`)."""
    return to_rgb(Image.open(io.BytesIO(data)))


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Fully decode `data` and check it against `limits`; raise BadImage with the reason.

    The pixel limit is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing; the full decode then catches truncated and corrupt files.
    """
    if len(data) > limits.max_bytes:
        raise BadImage("image_too_large", f"{len(data)} bytes > max_bytes {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise BadImage("decompression_bomb",
                               f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}")
            fmt = img.format
            img.load()
            orientation = exif_orientation(img)
            phash = perceptual_hash(to_rgb(img))  # the conversion training does must succeed too
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        code = "image_truncated" if "truncated" in str(e).lower() else "image_undecodable"
        raise BadImage(code, _ADDRESS.sub("", f"{type(e).__name__}: {e}")) from None
    if min(width, height) < limits.min_side:
        raise BadImage("image_too_small", f"{width}x{height}: shorter side < min_side {limits.min_side}")
    ext = _EXTENSIONS.get(fmt or "")
    if ext is None:
        raise BadImage("image_format", f"unsupported format {fmt!r}")
    if orientation in (5, 6, 7, 8):  # a quarter turn: the upright image is height x width
        width, height = height, width
    return ImageInfo(width, height, ext, orientation, phash)


def grid_pinpoints(geometry: VisionGeometry) -> list[tuple[int, int]]:
    """Candidate canvases (width, height) in pixels, in the reference's order (i-major, j-minor)."""
    t = geometry.tile_size
    return [(i * t, j * t) for i in range(1, geometry.max_grid + 1)
            for j in range(1, geometry.max_grid + 1)]


def select_best_resolution(width: int, height: int,
                           candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas that keeps the most of the image's pixels, then wastes the least (LLaVA's rule;
    only a strictly better candidate replaces the current one)."""
    best, best_effective, best_waste = candidates[0], -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cw, ch), effective, waste
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """Where an image's anyres features come from and how many survive.

    The grid_w x grid_h tiles form a (g*grid_h, g*grid_w) feature map (g patches per tile side).
    Rows [top, bottom) and columns [left, right) saw image, the rest only letterbox padding; the
    kept map is then resized to rows x cols when it exceeds `max_tiles_area` tiles by > 10%.
    """

    grid_w: int
    grid_h: int
    top: int
    bottom: int
    left: int
    right: int
    rows: int
    cols: int


def anyres_layout(width: int, height: int, geometry: VisionGeometry) -> AnyresLayout:
    g = geometry.patches_per_side
    cw, ch = select_best_resolution(width, height, grid_pinpoints(geometry))
    grid_w, grid_h = cw // geometry.tile_size, ch // geometry.tile_size
    rows, cols = g * grid_h, g * grid_w
    top, bottom, left, right = 0, rows, 0, cols
    if width / height > cols / rows:       # padding was added above and below
        pad = (rows - int(height * (cols / width))) // 2
        top, bottom = pad, rows - pad
    else:                                   # padding was added left and right
        pad = (cols - int(width * (rows / height))) // 2
        left, right = pad, cols - pad
    rows, cols = bottom - top, right - left
    times = math.sqrt(rows * cols / (geometry.max_tiles_area * g * g))
    if times > 1.1:
        rows, cols = int(rows // times), int(cols // times)
    return AnyresLayout(grid_w, grid_h, top, bottom, left, right, rows, cols)


def anyres_feature_shape(width: int, height: int, geometry: VisionGeometry) -> tuple[int, int, int, int]:
    """(grid_w, grid_h, rows, cols) of an image's final anyres feature map."""
    lay = anyres_layout(width, height, geometry)
    return lay.grid_w, lay.grid_h, lay.rows, lay.cols


def image_token_count(width: int, height: int, geometry: VisionGeometry, aspect: str,
                      n_images_in_sample: int = 1) -> int:
    """Feature tokens one image contributes to the spliced sequence.

    square (stage 1): g*g, no newline.  Several images in one sample: each padded to a square,
    one tile plus one newline, g*g + 1.  anyres_max_N: the base view g*g plus rows*(cols + 1),
    a newline after every row.  With so400m geometry: 384x384 -> 1485, 640x480 -> 2929.
    """
    g = geometry.patches_per_side
    if aspect == "square":
        return g * g
    if n_images_in_sample > 1:
        return g * g + 1
    _, _, rows, cols = anyres_feature_shape(width, height, geometry)
    return g * g + rows * (cols + 1)


# ---- pixels for the vision tower ---------------------------------------------------------------

def _to_array(img: Image.Image) -> "np.ndarray":
    """(3, T, T) float32 normalised as SigLIP expects: x / 255, then mean = std = 0.5."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def image_tiles(img: Image.Image, geometry: VisionGeometry, aspect: str,
                n_images_in_sample: int = 1) -> "np.ndarray":
    """The tiles the tower sees for one image: (n_tiles, 3, T, T) float32, base view first.

    square: one squashed view.  Several images in a sample: padded to a square with the mean
    colour (127,127,127), one view.  anyres: the squashed base view, then the best grid's tiles,
    row-major, cut from the image resized to fit the canvas and centred on black (LLaVA's
    resize_and_pad_image; Pillow's default BICUBIC resampling).
    """
    t = geometry.tile_size
    img = to_rgb(img)
    if aspect == "square":
        return np.stack([_to_array(img.resize((t, t), Image.Resampling.BICUBIC))])
    if n_images_in_sample > 1:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (127, 127, 127))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return np.stack([_to_array(canvas.resize((t, t), Image.Resampling.BICUBIC))])
    width, height = img.size
    cw, ch = select_best_resolution(width, height, grid_pinpoints(geometry))
    if cw / width < ch / height:
        new_w, new_h = cw, min(math.ceil(height * cw / width), ch)
    else:
        new_w, new_h = min(math.ceil(width * ch / height), cw), ch
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC), ((cw - new_w) // 2, (ch - new_h) // 2))
    tiles = [img.resize((t, t), Image.Resampling.BICUBIC)]
    tiles += [canvas.crop((x, y, x + t, y + t)) for y in range(0, ch, t) for x in range(0, cw, t)]
    return np.stack([_to_array(tile) for tile in tiles])
