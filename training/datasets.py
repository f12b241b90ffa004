"""What the training stages draw their pairs from: the synthetic pool (assets/synthetic.py),
or pairs of real video frames (FrameFolder), or both (WithFrames, the estimator stage).

FrameFolder reads the "vox-png" layout of the First Order Motion Model's VoxCeleb preprocessing
(Siarohin et al. 2019, NeurIPS; VoxCeleb1: Nagrani et al. 2017):
    root/{train,test}/<person_id>#<youtube_id>#<start>#<end>.mp4/<frame:07d>.png
where each ".mp4" is a DIRECTORY of 256×256 PNG frames and the identity is the text before the
first '#'. A plain folder of clip folders (root/<split>/<clip>/ or, without root/<split>,
root/<clip>/) works too; the same rule then makes the clip name the identity. DiffFAE trains on
two frames of one person, source I_S and query I_Q (Wang et al. 2024, §5.1).
"""
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from assets.synthetic import SyntheticPortraits, load_pool
from layers import require
from runtime.guard import write_atomic
from runtime.images import MAX_SIZE, MIN_SIZE, int_in, load_image, one_line

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_FRAMES = 2  # a pair needs two frames: shorter clips are skipped
INDEX_VERSION = 1
WARN_NAMES = 3  # clip names quoted in the "skipped clips" warning
CLIP_DRAWS = 1000  # pairs drawn from each clip of a folder: a clip is not one pair forever


def make_dataset(cfg, master):
    """Real frames of the folder cfg.data, or synthetic pairs: a pool rendered by rank 0 the
    first time and cached under <out>/data/ (about 200 MB for 6,000 pairs at 64 px). The
    estimator stage takes a folder's frames beside the synthetic pairs (WithFrames)."""
    if cfg.data != "synthetic":
        frames = FrameFolder(cfg.data, "train", cfg.image_size, seed=cfg.seed,
                             draws=CLIP_DRAWS)
        if cfg.stage != "estimator":
            return frames
        return WithFrames(synthetic_pairs(cfg, master), frames)
    return synthetic_pairs(cfg, master)


def synthetic_pairs(cfg, master):
    if cfg.pool == 0:  # each batch rendered as it is drawn (a 256 px pool would fill the memory)
        return SyntheticPortraits(cfg.image_size, "train", cfg.seed, identities=cfg.identities)
    args = (Path(cfg.out) / "data", cfg.image_size, cfg.pool, cfg.identities, cfg.seed)
    if master:
        load_pool(*args, workers=cfg.workers)  # rendered (again) here if it must be
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's pool
    return load_pool(*args, render=False)


class WithFrames(torch.utils.data.Dataset):
    """Synthetic pairs, with their exact coefficients, each beside a pair of frames that have
    none: item i is pair i // F of `pairs` with the frames "frame_source" and "frame_query" of
    clip i % F of `frames` (F clips), so that a uniform draw of i draws both uniformly and
    independently. The estimator stage learns from the first by regression and from the second
    through the renderer alone."""

    def __init__(self, pairs, frames):
        self.pairs, self.frames = pairs, frames
        self.identities = frames.identities

    def __len__(self):
        return len(self.pairs) * len(self.frames)

    def __getitems__(self, indices):
        count = len(self.frames)
        items = self.pairs.__getitems__([i // count for i in indices])
        for item, i in zip(items, indices):
            clip = self.frames[i % count]
            item["frame_source"], item["frame_query"] = clip["source"], clip["query"]
        return items


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
        return None, one_line(error)
    if isinstance(index, dict) and index.get("version") not in (None, INDEX_VERSION):
        return None, None
    try:
        require(isinstance(index["split_dir"], str) and isinstance(index["mtime_ns"], int)
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
        require(isinstance(split, str) and split not in ("", ".", "..")
                 and os.path.basename(split) == split,
                 f"split must be a folder name such as 'train' or 'test', got {split!r}")
        require(int_in(seed, 0), f"seed must be an int >= 0, got {seed!r}")
        require(int_in(size, MIN_SIZE, MAX_SIZE),
                 f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
        require(int_in(draws, 1), f"draws must be an int >= 1, got {draws!r}")
        self.size, self.seed, self.draws = int(size), int(seed), int(draws)
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        require(self.root.is_dir(), f"{self.root}: dataset root not found (or not a folder)")
        nested = self.root / split
        self.split_dir = nested if nested.is_dir() else self.root
        index = self._load_index(split)

        require(self.split_dir != self.root or any(frames for _, _, frames in index["clips"]),
                 f"{nested}: split folder not found, and {self.root} holds no clip folders of "
                 f"{'/'.join(FRAME_SUFFIXES)} frames")
        kept = [(name, frames) for name, _, frames in index["clips"] if len(frames) >= MIN_FRAMES]
        skipped = [name for name, _, frames in index["clips"] if len(frames) < MIN_FRAMES]
        require(kept, f"{self.split_dir}: no clip folder has >= {MIN_FRAMES} frames "
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
                problems.append(f"{path} ({one_line(error.strerror or error)})")
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
