"""Image I/O for every program, and FrameFolder: pairs of real video frames for training.

load_image(path, S) turns any still image Pillow can read into a (3, S, S) float32 tensor in
[-1, 1], in this order:
  1. decode fully (`Image.load()` inside the error handling, so a truncated file fails here and
     not later inside a DataLoader worker); refuse sources above MAX_IMAGE_PIXELS;
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
     Lanczos overshoot is clipped to [0, 1];
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
The directory scan is cached as JSON and revalidated with os.stat alone (no listing).

Shapes: S output side (the `size` argument), H/W source image height/width.
"""
import hashlib
import json
import operator
import os
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from layers import REGION_COLOURS

MIN_SIZE = 8  # below this a face is no longer a face; also catches a swapped (size, path)
MAX_SIZE = 4096  # 16× the paper's 256 px (DiffFAE §5.1); larger is almost surely a typo
# Refuse sources above 64 Mi pixels (8192 × 8192): lower than Pillow's own decompression-bomb
# threshold (Image.MAX_IMAGE_PIXELS ≈ 89 M), a full decode of one would take ~1 GB in float.
MAX_IMAGE_PIXELS = 8192 * 8192
EIGHT_BIT_MAX = 255.0
SIXTEEN_BIT_MAX = 65535.0
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
RESAMPLE = Image.Resampling.LANCZOS

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
PAIR_MODES = ("clip", "identity")
INDEX_VERSION = 1
INDEX_PREFIX = ".framefolder-"
CACHE_SUBDIR = "difffae"
HASH_CHARS = 16
WARN_NAMES = 3  # clip names quoted in the "skipped clips" warning


class ImageError(ValueError):
    """An image could not be loaded; the message is one line: '<file>: <problem>'."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_size(size: object, where: str) -> int:
    valid = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
    if not valid or not MIN_SIZE <= size <= MAX_SIZE:
        raise ImageError(f"{where}: size must be an int in [{MIN_SIZE}, {MAX_SIZE}], "
                         f"got {size!r}")
    return int(size)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) float32 in [0, 1], alpha composited over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float32) / SIXTEEN_BIT_MAX  # (H, W)
        grey = np.clip(grey, 0.0, 1.0)
        return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)  # (H, W), floats in [0, 1]
        return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / EIGHT_BIT_MAX  # (H, W, 4)
        alpha = rgba[:, :, 3:]  # (H, W, 1)
        return rgba[:, :, :3] * alpha + (1.0 - alpha)  # over white
    return np.asarray(image.convert("RGB"), dtype=np.float32) / EIGHT_BIT_MAX  # (H, W, 3)


def from_pil(image: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop, convert and resize an in-memory Pillow image (steps 3-6 above; no EXIF).

    Parameters
    ----------
    image : PIL.Image.Image, any mode Pillow can convert to RGB, H, W >= 1
    size : int in [MIN_SIZE, MAX_SIZE], the output side S

    Returns
    -------
    torch.Tensor, (3, S, S) float32 in [-1, 1]
    """
    size = _check_size(size, "image")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image: zero-sized ({width}x{height})")
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    rgb = _to_rgb_array(square)  # (side, side, 3)
    if side != size:
        channels = [Image.fromarray(np.ascontiguousarray(rgb[:, :, c])) for c in range(3)]
        resized = [np.asarray(c.resize((size, size), RESAMPLE)) for c in channels]
        rgb = np.clip(np.stack(resized, axis=2), 0.0, 1.0)  # (S, S, 3)
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, S, S)
    return chw.float() * 2.0 - 1.0


def load_image(path, size: int) -> torch.Tensor:
    """Read an image file as a square (3, S, S) float32 tensor in [-1, 1].

    Parameters
    ----------
    path : str or os.PathLike, any still image format Pillow reads (first frame of animations)
    size : int in [MIN_SIZE, MAX_SIZE], the output side S

    Returns
    -------
    torch.Tensor, (3, S, S) float32 in [-1, 1]; see the module docstring for the steps.

    Raises
    ------
    ImageError
        one-line message naming the file: bad size, missing, a directory, empty, not an image,
        truncated/corrupt, larger than MAX_IMAGE_PIXELS, zero-sized.
    """
    name = os.fspath(path)
    size = _check_size(size, name)
    if not os.path.exists(name):
        raise ImageError(f"{name}: no such file")
    if os.path.isdir(name):
        raise ImageError(f"{name}: is a directory, not an image file")
    if os.path.getsize(name) == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its threshold and 2× it; make that an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{name}: {width}x{height} is larger than the limit of "
                                     f"{MAX_IMAGE_PIXELS} pixels (data.MAX_IMAGE_PIXELS)")
                if width < 1 or height < 1:
                    raise ImageError(f"{name}: zero-sized image ({width}x{height})")
                opened.load()
                upright = ImageOps.exif_transpose(opened)
            return from_pil(upright, size)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name}: too large to decode safely ({_one_line(error)})") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from error
    except Exception as error:
        # Pillow's format plugins signal corrupt data with OSError ("image file is truncated"),
        # SyntaxError, ValueError, EOFError, struct.error, IndexError, ... depending on the format.
        raise ImageError(f"{name}: cannot decode image ({type(error).__name__}: "
                         f"{_one_line(error)})") from error


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] → 8-bit RGB Pillow image (values clamped, then rounded)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor, got {shape}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    levels = (image.detach().to("cpu", torch.float64).clamp(-1.0, 1.0) + 1.0) * (EIGHT_BIT_MAX / 2)
    hwc = levels.round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(hwc.contiguous().numpy())


def save_image(image: torch.Tensor, path) -> None:
    """Write a (3, H, W) tensor in [-1, 1] as an 8-bit RGB PNG, creating parent folders.

    load_image(path, S) of the result gives back the tensor to within 1/255 when H = W = S.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: save_image writes PNG, the path must end in .png")
    picture = to_pil(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target, format="PNG")


def _identity_of(clip_name: str) -> str:
    # vox-png: "id10001#1zcIwhmdeo4#000064#000320.mp4" → "id10001"; a plain name is its own id
    return clip_name.split("#", 1)[0]


def _scan(split_dir: Path) -> dict:
    """List every clip folder and its frame files (one pass; the result is what we cache)."""
    try:
        # mtimes are read BEFORE listing: a change during the scan leaves the cache stale, not wrong
        split_mtime = os.stat(split_dir).st_mtime_ns
        with os.scandir(split_dir) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        clips = []
        for name in names:
            clip_dir = split_dir / name
            clip_mtime = os.stat(clip_dir).st_mtime_ns
            with os.scandir(clip_dir) as entries:
                frames = sorted(e.name for e in entries
                                if not e.name.startswith(".") and e.is_file()
                                and os.path.splitext(e.name)[1].lower() in FRAME_SUFFIXES)
            clips.append([name, clip_mtime, frames])
    except OSError as error:
        raise ValueError(f"{error.filename or split_dir}: cannot list folder "
                         f"({_one_line(error.strerror or error)})") from error
    return {"version": INDEX_VERSION, "split_dir": str(split_dir), "mtime_ns": split_mtime,
            "clips": clips}


def _is_fresh(index: object, split_dir: Path) -> bool:
    """True when a cached index describes split_dir as it is now (os.stat only, no listing)."""
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        return False
    if index.get("split_dir") != str(split_dir):
        return False
    try:
        if os.stat(split_dir).st_mtime_ns != index["mtime_ns"]:
            return False
        return all(os.stat(split_dir / name).st_mtime_ns == mtime
                   for name, mtime, _ in index["clips"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _read_index(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


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
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_SUBDIR


class FrameFolder(Dataset):
    """Pairs of frames of one person from a folder of clip folders (map-style Dataset).

    len(dataset) = number of usable clips; item i uses clip i and
    `np.random.default_rng([seed, i])`, so it is the same in every process and every instance.
      pairs="clip":     source and query are two different frames of clip i;
      pairs="identity": source is a frame of clip i, query is uniform over all OTHER frames of
                        that person, in any of their clips of this split.
    Reassign `dataset.seed` (e.g. base seed + epoch) for new pairs.

    The scan is cached as JSON in root/.framefolder-<split>.json, or, if that cannot be written
    or the clips lie directly under root (writing there would change the very mtime the cache
    checks), in $XDG_CACHE_HOME/difffae/ (default ~/.cache/difffae/) under a hash of the path.
    The cache keeps every clip's frame names and the mtimes of the split folder and of each clip
    folder; any mtime change (a clip or frame added, removed, renamed) triggers a rescan.
    Edits that keep mtimes (same-second edits on coarse-timestamp file systems) are not seen.

    Parameters
    ----------
    root : str or os.PathLike, dataset root (holds `split`, or the clip folders directly)
    split : str, sub-folder name, e.g. "train" or "test"
    size : int in [MIN_SIZE, MAX_SIZE], output side S
    pairs : "clip" or "identity"
    seed : int >= 0
    min_frames : int >= 2; clips with fewer frames are skipped (one warning for all)

    Attributes
    ----------
    identities : list of str, sorted person ids of the usable clips
    clips : list of (identity, clip_dir, [frame names sorted]), sorted by clip folder name
    split_dir : pathlib.Path, the folder the clips were found in

    Items: dict with source, query: (3, S, S) float32 in [-1, 1]; identity: int, index into
    `identities`; source_path, query_path: str. (Real frames carry no ground-truth parameters.)
    """

    def __init__(self, root, split: str = "train", size: int = 256, pairs: str = "clip",
                 seed: int = 0, min_frames: int = 2):
        if not isinstance(split, str) or split in ("", ".", "..") or "/" in split \
                or os.sep in split:
            raise ValueError(f"split must be a folder name such as 'train' or 'test', "
                             f"got {split!r}")
        if pairs not in PAIR_MODES:
            raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not isinstance(min_frames, (int, np.integer)) or isinstance(min_frames, bool) \
                or min_frames < 2:
            raise ValueError(f"min_frames must be an int >= 2 (a pair needs two frames), "
                             f"got {min_frames!r}")
        self.size = _check_size(size, "FrameFolder")
        self.pairs = pairs
        self.seed = int(seed)
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: dataset root not found (or not a folder)")
        nested = self.root / split
        self.split_dir = nested if nested.is_dir() else self.root
        index = self._load_index(split)

        counts = [len(frames) for _, _, frames in index["clips"]]
        if self.split_dir == self.root and not any(counts):
            raise ValueError(f"{nested}: split folder not found, and {self.root} holds no clip "
                             f"folders of {'/'.join(FRAME_SUFFIXES)} frames")
        kept = [(name, frames) for name, _, frames in index["clips"] if len(frames) >= min_frames]
        skipped = [name for name, _, frames in index["clips"] if len(frames) < min_frames]
        if not kept:
            raise ValueError(f"{self.split_dir}: no clip folder has >= {min_frames} frames "
                             f"({len(skipped)} folders checked)")
        if skipped:
            shown = ", ".join(skipped[:WARN_NAMES]) + (", ..." if len(skipped) > WARN_NAMES else "")
            warnings.warn(f"{self.split_dir}: skipped {len(skipped)} clip folder(s) with fewer "
                          f"than {min_frames} frames: {shown}", stacklevel=2)

        self.identities: List[str] = sorted({_identity_of(name) for name, _ in kept})
        self._identity_ids = {person: k for k, person in enumerate(self.identities)}
        self.clips: List[Tuple[str, str, List[str]]] = [
            (_identity_of(name), str(self.split_dir / name), frames) for name, frames in kept]
        # identity pairs: each person's frames, all clips end to end, as one flat pool
        members: List[List[int]] = [[] for _ in self.identities]
        for c, (person, _, _) in enumerate(self.clips):
            members[self._identity_ids[person]].append(c)
        self._pool_clips = [np.asarray(m, dtype=np.int64) for m in members]
        self._pool_offsets = [np.concatenate([[0], np.cumsum([len(self.clips[c][2]) for c in m])])
                              for m in members]
        self._pool_start = np.zeros(len(self.clips), dtype=np.int64)
        for clip_ids, offsets in zip(self._pool_clips, self._pool_offsets):
            self._pool_start[clip_ids] = offsets[:-1]

    def _cache_paths(self, split: str) -> Sequence[Path]:
        key = hashlib.sha256(f"{self.root}\0{split}".encode("utf-8")).hexdigest()[:HASH_CHARS]
        fallback = _cache_home() / f"framefolder-{key}-{split}.json"
        if self.split_dir == self.root:
            return [fallback]
        return [self.root / f"{INDEX_PREFIX}{split}.json", fallback]

    def _load_index(self, split: str) -> dict:
        paths = self._cache_paths(split)
        for path in paths:
            index = _read_index(path)
            if _is_fresh(index, self.split_dir):
                return index
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
        return len(self.clips)

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if i < 0:
            i += len(self.clips)
        if not 0 <= i < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        rng = np.random.default_rng([self.seed, i])
        person, clip_dir, frames = self.clips[i]
        if self.pairs == "clip":
            a, b = rng.choice(len(frames), size=2, replace=False)
            source_path = os.path.join(clip_dir, frames[a])
            query_path = os.path.join(clip_dir, frames[b])
        else:
            a = int(rng.integers(len(frames)))
            source_path = os.path.join(clip_dir, frames[a])
            k = self._identity_ids[person]
            offsets = self._pool_offsets[k]
            own = int(self._pool_start[i]) + a  # the source's place in the person's pool
            flat = int(rng.integers(int(offsets[-1]) - 1))
            flat += flat >= own  # uniform over the pool without the source
            slot = int(np.searchsorted(offsets, flat, side="right")) - 1
            _, query_dir, query_frames = self.clips[int(self._pool_clips[k][slot])]
            query_path = os.path.join(query_dir, query_frames[flat - int(offsets[slot])])
        return {"source": load_image(source_path, self.size),
                "query": load_image(query_path, self.size),
                "identity": self._identity_ids[person],
                "source_path": source_path,
                "query_path": query_path}


# ---------------------------------------------------------------------------------------------
# Command line: export the synthetic data set to disk, or preview it
# ---------------------------------------------------------------------------------------------

OVERLAY_ALPHA = 0.55
EXPORT_BATCH = 32


def export_synthetic(out_dir, n, size, split="train", seed=0):
    """Writes n synthetic items in the vox-png layout, one clip of two frames per item:
    out_dir/<split>/id<identity>#synthetic#<item>#<item>.mp4/0000000.png (source) and
    0000001.png (train: query; test: target, i.e. the source person in the query's frame), plus
    params.json with the generating coefficients of both frames. Returns the clip folders."""
    from synthetic import SyntheticPortraits
    dataset = SyntheticPortraits(size, split, seed, length=n)
    clips = []
    for start in range(0, n, EXPORT_BATCH):
        batch = dataset.__getitems__(range(start, min(n, start + EXPORT_BATCH)))
        for index, item in enumerate(batch, start):
            name = f"id{item['identity']:07d}#synthetic#{index:06d}#{index:06d}.mp4"
            clip = Path(out_dir) / split / name
            second = item["target"] if split == "test" else item["query"]
            save_image(item["source"], clip / "0000000.png")
            save_image(second, clip / "0000001.png")
            params = {"source": item["source_params"], "query": item["query_params"]}
            text = json.dumps({frame: {key: value.tolist() for key, value in p.items()}
                               for frame, p in params.items()})
            write_atomic(clip / "params.json", lambda file: file.write(text.encode()))
            clips.append(clip)
    return clips


def preview_grid(size=128, n=6, seed=0):
    """(3, H, W) grid: a row per item — source | query | query regions overlay | target; train
    items first, then test items (whose target is the ground-truth edit)."""
    from synthetic import SyntheticPortraits
    rows = []
    for split in ("train", "test"):
        for item in SyntheticPortraits(size, split, seed, length=n).__getitems__(range(n)):
            colours = REGION_COLOURS[item["query_regions"]].permute(2, 0, 1) * 2 - 1
            overlay = item["query"] + OVERLAY_ALPHA * (colours - item["query"])
            target = item.get("target", torch.full_like(item["query"], -1.0))
            rows.append(torch.cat([item["source"], item["query"], overlay, target], 2))
    return torch.cat(rows, 1)


EXAMPLE_ITEMS = (0, 1)  # test items: the first gives src / qry / target, the second the swap


def write_examples(out_dir, size, seed=0):
    """The README's example inputs, from held-out test identities: src.png, qry.png (another
    person), target.png (the exact edit: src's person in qry's frame) and other.png (a third
    person, for --swap). Returns the paths written."""
    from synthetic import SyntheticPortraits
    first, second = SyntheticPortraits(size, "test", seed).__getitems__(EXAMPLE_ITEMS)
    images = {"src": first["source"], "qry": first["query"], "target": first["target"],
              "other": second["source"]}
    paths = []
    for name, image in images.items():
        paths.append(Path(out_dir) / f"{name}.png")
        save_image(image, paths[-1])
    return paths


def main(argv=None):
    import argparse
    import sys
    parser = argparse.ArgumentParser(
        description="Export, preview or sample the synthetic portraits.")
    parser.add_argument("--export", metavar="DIR", help="write items in the vox-png layout")
    parser.add_argument("--n", type=int, default=1000, help="items to export")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", metavar="PNG", help="write a grid of train and test items")
    parser.add_argument("--examples", metavar="DIR", help="write src.png, qry.png, target.png "
                        "and other.png from held-out identities")
    args = parser.parse_args(argv)
    if not (args.export or args.preview or args.examples):
        parser.error("nothing to do: give --export DIR, --preview PNG or --examples DIR")
    try:
        if args.export:
            if args.n < 1:
                raise ValueError(f"--n {args.n}: expected at least 1 item")
            clips = export_synthetic(args.export, args.n, args.size, args.split, args.seed)
            print(f"wrote {len(clips)} clips to {Path(args.export) / args.split}")
        if args.preview:
            save_image(preview_grid(args.size, seed=args.seed), args.preview)
            print(f"wrote {args.preview}")
        if args.examples:
            paths = write_examples(args.examples, args.size, args.seed)
            print("wrote " + ", ".join(str(p) for p in paths))
    except (ValueError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
