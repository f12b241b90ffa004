"""Image I/O for every program: images in, checked, and images out.

load_image(path, S) turns any still image Pillow can read into a (3, S, S) float32 tensor in
[-1, 1], in this order:
  1. decode fully (`Image.load()` inside the error handling, so a truncated file fails here and
     not later inside a DataLoader worker); a JPEG above MAX_IMAGE_PIXELS is decoded at the
     smallest of 1/2, 1/4, 1/8 scale that keeps S pixels (`Image.draft`), other formats above
     it are refused;
  2. apply the EXIF orientation tag 0x0112 (`ImageOps.exif_transpose`; EXIF 2.3, TIFF 6.0 tag 274):
     phone photos are stored sideways and only display upright;
  3. centre-crop to a square of side min(H, W);
  4. convert to RGB in [0, 1]: 8-bit modes / 255; 16-bit grey ("I;16*", and "I" as Pillow opens
     some 16-bit PNGs) / 65535; float grey "F" taken as [0, 1]; CMYK by Pillow's plain
     conversion (no ICC colour management);
     images with alpha (RGBA, LA, PA, palette or RGB with a tRNS transparency) are composited
     over WHITE with the Porter-Duff "over" operator (Porter & Duff 1984):
         C = α·C_image + (1 − α)·1
     white, because transparent areas of portraits are usually a cut-out background;
  5. resize to S × S with Lanczos (Pillow's `Image.resize`, whose kernel support widens by the
     downscale factor, i.e. antialiased), in float so 16-bit sources keep their precision;
     Lanczos overshoot is clipped to [0, 1]; a warning when the square is enlarged more than
     MAX_UPSCALE times (a model would edit the detail the enlargement invented);
  6. x ↦ 2x − 1.
Every failure (missing file, directory, not an image, truncated or corrupt data, too large,
empty, bad S) raises ImageError, a ValueError whose message is one line naming the file.
Multi-frame files (GIF, APNG, TIFF) give their first frame.

Shapes: S output side (the `size` argument), H/W source image height/width.
"""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIZE = 8  # below this a face is no longer a face; also catches a swapped (size, path)
MAX_SIZE = 4096  # 16× the paper's 256 px (DiffFAE §5.1); larger is almost surely a typo
# Sources above 64 Mi pixels (8192 × 8192) are decoded at a reduced scale where the format
# allows it (JPEG's DCT scaling by 1/2, 1/4 or 1/8), else refused: a full decode of one takes
# ~1 GB in float. This check replaces Pillow's own decompression-bomb check, whose message
# names no limit and no way past it.
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = None
MAX_UPSCALE = 4  # enlargements beyond this warn: a 16 px face at 64 px is already a blur
EIGHT_BIT_MAX = 255.0
SIXTEEN_BIT_MAX = 65535.0
GREY_SCALE = {"I;16": SIXTEEN_BIT_MAX, "I;16L": SIXTEEN_BIT_MAX, "I;16B": SIXTEEN_BIT_MAX,
              "I;16N": SIXTEEN_BIT_MAX, "I": SIXTEEN_BIT_MAX, "F": 1.0}  # mode → full scale
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
RESAMPLE = Image.Resampling.LANCZOS


class ImageError(ValueError):
    """An image could not be loaded; the message is one line: '<file>: <problem>'."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def int_in(value: object, low: int, high: float = float("inf")) -> bool:
    return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and low <= value <= high)


def _require(ok: bool, problem: str, error=ValueError) -> None:
    if not ok:
        raise error(problem)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) float32 in [0, 1], alpha composited over white."""
    if image.mode in GREY_SCALE:
        grey = np.asarray(image, dtype=np.float32) / GREY_SCALE[image.mode]  # (H, W)
        return np.repeat(np.clip(grey, 0.0, 1.0)[:, :, None], 3, axis=2)  # (H, W, 3)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / EIGHT_BIT_MAX  # (H, W, 4)
        alpha = rgba[:, :, 3:]  # (H, W, 1)
        return rgba[:, :, :3] * alpha + (1.0 - alpha)  # over white
    return np.asarray(image.convert("RGB"), dtype=np.float32) / EIGHT_BIT_MAX  # (H, W, 3)


def from_pil(image: Image.Image, size: int) -> torch.Tensor:
    """Steps 3-6 above (no EXIF) on an in-memory Pillow image of any mode Pillow converts to RGB:
    centre-crop, convert, resize to S = size. Returns (3, S, S) float32 in [-1, 1]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    rgb = _to_rgb_array(image.crop((left, top, left + side, top + side)))  # (side, side, 3)
    if side != size:
        # Pillow resizes float images one channel ("F" mode) at a time
        channels = [Image.fromarray(np.ascontiguousarray(rgb[:, :, c])) for c in range(3)]
        resized = [np.asarray(c.resize((size, size), RESAMPLE)) for c in channels]
        rgb = np.clip(np.stack(resized, axis=2), 0.0, 1.0)  # (S, S, 3)
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, S, S)
    return chw.float() * 2.0 - 1.0


def load_image(path, size: int) -> torch.Tensor:
    """Read an image file as a (3, S, S) float32 tensor in [-1, 1], S = size in [MIN_SIZE,
    MAX_SIZE], by the steps above; ImageError (one line naming the file) if it cannot."""
    name = os.fspath(path)
    _require(int_in(size, MIN_SIZE, MAX_SIZE),
             f"{name}: size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}", ImageError)
    _require(os.path.exists(name), f"{name}: no such file", ImageError)
    _require(not os.path.isdir(name), f"{name}: is a directory, not an image file", ImageError)
    _require(os.path.getsize(name) > 0, f"{name}: empty file (0 bytes)", ImageError)
    try:
        with Image.open(name) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS and opened.format == "JPEG":
                opened.draft(opened.mode, (size, size))  # a smaller decode, still >= S × S
            width, height = opened.size
            _require(width * height <= MAX_IMAGE_PIXELS, f"{name}: {width}x{height} is more than "
                     f"the limit of {MAX_IMAGE_PIXELS / 2 ** 20:.0f} Mi pixels; shrink it first "
                     f"(e.g. to 4096 px on its longer side) or save it as JPEG", ImageError)
            opened.load()  # decode it all now, so a truncated file fails here
            image = from_pil(ImageOps.exif_transpose(opened), int(size))
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from error
    except Exception as error:
        # Pillow's format plugins signal corrupt data with OSError ("image file is truncated"),
        # SyntaxError, ValueError, EOFError, struct.error, ... depending on the format.
        raise ImageError(f"{name}: cannot decode image ({type(error).__name__}: "
                         f"{one_line(error)})") from error
    if size > MAX_UPSCALE * min(width, height):
        warnings.warn(f"{name}: {width}x{height} enlarged {size / min(width, height):.0f}x to "
                      f"{size}x{size}; the face will be mostly invented", stacklevel=2)
    return image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] → 8-bit RGB Pillow image (values clamped, then rounded)."""
    _require(torch.is_tensor(image) and image.dim() == 3 and image.shape[0] == 3,
             f"image must be a (3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    _require(torch.isfinite(image).all(), "image contains NaN or infinite values")
    levels = (image.detach().to("cpu", torch.float64).clamp(-1.0, 1.0) + 1.0) * (EIGHT_BIT_MAX / 2)
    hwc = levels.round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(hwc.contiguous().numpy())


def save_image(image: torch.Tensor, path) -> None:
    """Write a (3, H, W) tensor in [-1, 1] as an 8-bit RGB PNG, creating parent folders;
    load_image(path, S) of the result gives back the tensor to within 1/255 when H = W = S."""
    target = Path(path)
    _require(target.suffix.lower() == ".png", f"{target}: save_image writes PNG, use a .png name")
    picture = to_pil(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target, format="PNG")
