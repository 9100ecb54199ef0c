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
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from lladav.config import ImageLimits, VisionGeometry
from lladav.data import RecordError

# Truncated files must fail, never load half-grey (the reference sets this to True).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# PIL format name -> file extension used for the shard member (webdataset decodes by extension).
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tiff"}


class BadImage(RecordError):
    """An image that must not be trained on; `code` is the reject reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    ext: str  # shard member extension: jpg, png, ...


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
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        code = "image_truncated" if "truncated" in str(e).lower() else "image_undecodable"
        raise BadImage(code, f"{type(e).__name__}: {e}") from None
    if min(width, height) < limits.min_side:
        raise BadImage("image_too_small", f"{width}x{height}: shorter side < min_side {limits.min_side}")
    ext = _EXTENSIONS.get(fmt or "")
    if ext is None:
        raise BadImage("image_format", f"unsupported format {fmt!r}")
    return ImageInfo(width, height, ext)


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
    img = img.convert("RGB")
    if aspect == "square":
        return np.stack([_to_array(img.resize((t, t), Image.BICUBIC))])
    if n_images_in_sample > 1:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), (127, 127, 127))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return np.stack([_to_array(canvas.resize((t, t), Image.BICUBIC))])
    width, height = img.size
    cw, ch = select_best_resolution(width, height, grid_pinpoints(geometry))
    if cw / width < ch / height:
        new_w, new_h = cw, min(math.ceil(height * cw / width), ch)
    else:
        new_w, new_h = min(math.ceil(width * ch / height), cw), ch
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.BICUBIC), ((cw - new_w) // 2, (ch - new_h) // 2))
    tiles = [img.resize((t, t), Image.BICUBIC)]
    tiles += [canvas.crop((x, y, x + t, y + t)) for y in range(0, ch, t) for x in range(0, cw, t)]
    return np.stack([_to_array(tile) for tile in tiles])
