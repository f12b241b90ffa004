"""Image I/O for every program, and FrameFolder: pairs of real video frames for training.

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

FrameFolder reads the "vox-png" layout of the First Order Motion Model's VoxCeleb preprocessing
(Siarohin et al. 2019, NeurIPS; VoxCeleb1: Nagrani et al. 2017):
    root/{train,test}/<person_id>#<youtube_id>#<start>#<end>.mp4/<frame:07d>.png
where each ".mp4" is a DIRECTORY of 256×256 PNG frames and the identity is the text before the
first '#'. A plain folder of clip folders (root/<split>/<clip>/ or, without root/<split>,
root/<clip>/) works too; the same rule then makes the clip name the identity. DiffFAE trains on
two frames of one person, source I_S and query I_Q (Wang et al. 2024, §5.1).

Shapes: S output side (the `size` argument), H/W source image height/width.
"""
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset


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

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_FRAMES = 2  # a pair needs two frames: shorter clips are skipped
INDEX_VERSION = 1
WARN_NAMES = 3  # clip names quoted in the "skipped clips" warning


class ImageError(ValueError):
    """An image could not be loaded; the message is one line: '<file>: <problem>'."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _int_in(value: object, low: int, high: float = float("inf")) -> bool:
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
    _require(_int_in(size, MIN_SIZE, MAX_SIZE),
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
                         f"{_one_line(error)})") from error
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


def write_atomic(path, write) -> None:
    """Call write(file) on a new temporary file beside path, then rename it over path: readers,
    and a crash or a full disk halfway, never leave half a file; the old one stays until then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def to_device(batch, device):
    """batch, a tensor or a dict of them (nested), moved to device; anything else kept."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _scan(split_dir: Path) -> dict:
    """List every clip folder and its frame files (one pass; the result is what we cache)."""
    # mtimes are read BEFORE listing: a change during the scan leaves the cache stale, not wrong
    split_mtime = os.stat(split_dir).st_mtime_ns
    with os.scandir(split_dir) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    clips = []
    for name in names:
        clip_mtime = os.stat(split_dir / name).st_mtime_ns
        with os.scandir(split_dir / name) as entries:
            frames = sorted(e.name for e in entries
                            if not e.name.startswith(".") and e.is_file()
                            and os.path.splitext(e.name)[1].lower() in FRAME_SUFFIXES)
        clips.append([name, clip_mtime, frames])
    return {"version": INDEX_VERSION, "split_dir": str(split_dir), "mtime_ns": split_mtime,
            "clips": clips}


def _read_fresh_index(path: Path, split_dir: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(index, problem): the index cached at path if it describes split_dir as it is now (os.stat
    only, no listing), else None; problem says why a cache file that is there cannot be an index
    at all (None when the file is missing, of another INDEX_VERSION or merely stale)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError:  # missing, a folder, unreadable: no cache here, nothing damaged
        return None, None
    except ValueError as error:  # not JSON, not UTF-8
        return None, _one_line(error)
    if isinstance(index, dict) and index.get("version") not in (None, INDEX_VERSION):
        return None, None
    try:
        _require(isinstance(index["split_dir"], str) and isinstance(index["mtime_ns"], int)
                 and all(isinstance(name, str) and isinstance(mtime, int)
                         and all(isinstance(frame, str) for frame in frames)
                         for name, mtime, frames in index["clips"]), "")
    except (KeyError, TypeError, ValueError):
        return None, "not a frame index"
    try:
        fresh = (index["split_dir"] == str(split_dir)
                 and os.stat(split_dir).st_mtime_ns == index["mtime_ns"]
                 and all(os.stat(split_dir / name).st_mtime_ns == mtime
                         for name, mtime, _ in index["clips"]))
    except OSError:  # a clip folder gone since
        return None, None
    return (index if fresh else None), None


class FrameFolder(Dataset):
    """Pairs of frames of one person from a folder of clip folders (map-style Dataset).

    len(dataset) = C usable clips × draws; item i is two different frames of clip c = i mod C,
    drawn by `np.random.default_rng([seed, c, i // C])`, so it is the same in every process and
    every instance, and each of a clip's `draws` items is a pair of its own: training
    (train.py) asks for many, so that a clip is not one pair forever.

    The scan is cached as JSON in root/.framefolder-<split>.json, or, if that cannot be written
    or the clips lie directly under root (writing there would change the very mtime the cache
    checks), in $XDG_CACHE_HOME/difffae/ (default ~/.cache/difffae/) under a hash of the path.
    The cache keeps every clip's frame names and the mtimes of the split folder and of each clip
    folder; any mtime change (a clip or frame added, removed, renamed) triggers a rescan.
    Edits that keep mtimes (same-second edits on coarse-timestamp file systems) are not seen.
    A damaged cache file (not JSON, not an index) is rebuilt, with a warning naming it.

    Parameters: root (holds `split`, or the clip folders directly); split, a sub-folder name
    such as "train" or "test"; size S in [MIN_SIZE, MAX_SIZE]; seed >= 0; draws >= 1, the pairs
    drawn from each clip.
    Clips of fewer than MIN_FRAMES frames are skipped, with one warning for all.

    Attributes: identities, the sorted person ids; clips, (identity, clip_dir, [sorted frame
    names]) of each usable clip, sorted by folder name; split_dir, where the clips were found.

    Items: dict with source, query: (3, S, S) float32 in [-1, 1]; identity: int, index into
    `identities`; source_path, query_path: str. (Real frames carry no ground-truth parameters.)
    """

    def __init__(self, root, split: str = "train", size: int = 256, seed: int = 0,
                 draws: int = 1):
        _require(isinstance(split, str) and split not in ("", ".", "..")
                 and os.path.basename(split) == split,
                 f"split must be a folder name such as 'train' or 'test', got {split!r}")
        _require(_int_in(seed, 0), f"seed must be an int >= 0, got {seed!r}")
        _require(_int_in(size, MIN_SIZE, MAX_SIZE),
                 f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
        _require(_int_in(draws, 1), f"draws must be an int >= 1, got {draws!r}")
        self.size, self.seed, self.draws = int(size), int(seed), int(draws)
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        _require(self.root.is_dir(), f"{self.root}: dataset root not found (or not a folder)")
        nested = self.root / split
        self.split_dir = nested if nested.is_dir() else self.root
        index = self._load_index(split)

        _require(self.split_dir != self.root or any(frames for _, _, frames in index["clips"]),
                 f"{nested}: split folder not found, and {self.root} holds no clip folders of "
                 f"{'/'.join(FRAME_SUFFIXES)} frames")
        kept = [(name, frames) for name, _, frames in index["clips"] if len(frames) >= MIN_FRAMES]
        skipped = [name for name, _, frames in index["clips"] if len(frames) < MIN_FRAMES]
        _require(kept, f"{self.split_dir}: no clip folder has >= {MIN_FRAMES} frames "
                       f"({len(skipped)} folders checked)")
        if skipped:
            shown = ", ".join(skipped[:WARN_NAMES]) + (", ..." if len(skipped) > WARN_NAMES else "")
            warnings.warn(f"{self.split_dir}: skipped {len(skipped)} clip folder(s) with fewer "
                          f"than {MIN_FRAMES} frames: {shown}", stacklevel=2)

        # the person is the text before the first "#" (a plain clip folder name is its own)
        self.clips: List[Tuple[str, str, List[str]]] = [
            (name.split("#", 1)[0], str(self.split_dir / name), frames) for name, frames in kept]
        self.identities: List[str] = sorted({person for person, _, _ in self.clips})
        self._identity_ids = {person: k for k, person in enumerate(self.identities)}

    def _load_index(self, split: str) -> dict:
        key = hashlib.sha256(f"{self.root}\0{split}".encode("utf-8")).hexdigest()[:16]
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        paths = [cache_home / "difffae" / f"framefolder-{key}-{split}.json"]
        if self.split_dir != self.root:
            paths.insert(0, self.root / f".framefolder-{split}.json")
        for path in paths:
            index, problem = _read_fresh_index(path, self.split_dir)
            if index is not None:
                return index
            if problem:  # derived data: say so, and build it again
                warnings.warn(f"{path}: damaged frame index cache ({problem}); rebuilding it",
                              stacklevel=3)
        index = _scan(self.split_dir)
        text = json.dumps(index, separators=(",", ":"))
        problems = []
        for path in paths:
            try:
                write_atomic(path, lambda file: file.write(text.encode()))
                return index
            except OSError as error:
                problems.append(f"{path} ({_one_line(error.strerror or error)})")
        warnings.warn(f"could not cache the frame index: {'; '.join(problems)}", stacklevel=3)
        return index

    def __len__(self) -> int:
        return len(self.clips) * self.draws

    def __getitem__(self, index) -> dict:
        i = range(len(self))[index]  # negative indices count from the end
        clip, draw = i % len(self.clips), i // len(self.clips)
        rng = np.random.default_rng([self.seed, clip, draw])
        person, clip_dir, frames = self.clips[clip]
        a, b = rng.choice(len(frames), size=2, replace=False)
        source_path, query_path = (os.path.join(clip_dir, frames[k]) for k in (a, b))
        return {"source": load_image(source_path, self.size), "source_path": source_path,
                "query": load_image(query_path, self.size), "query_path": query_path,
                "identity": self._identity_ids[person]}
