"""Drive a portrait with a clip: every frame of a video is a query of DiffFAE (Wang et al., ECCV
2024, arXiv 2403.17664, §4), and the source person follows its pose, expression and lighting.
The paper edits and scores stills; reenacting a clip is its main use (it draws its test pairs
from VoxCeleb clips, §5.1), and what a clip adds is the need to stay steady from frame to frame.

Reading a clip (`read_clip`): a folder of frames in name order, numbers in names compared by value
(frame2 before frame10); a clip folder of the vox-png layout,
<person>#<video>#<start>#<end>.mp4/<frame:07d>.png (training.datasets.FrameFolder), is such a
folder; or an animated image file (GIF, APNG, WebP). Every frame goes through
runtime.images.load_image / from_pil (centre-crop, resize to S). A clip with no frames, one frame, a
file that is not an image, or frames of different sizes is refused with one line naming the file,
before any sampling.

Steady by construction (`drive`). A DiffFAE sample is a deterministic function of the initial
noise z_T and the conditions (dpm++2m, or DDIM with η = 0), so
  - the source's conditions (its coefficients β, α, its slot tokens F and f_id) are computed
    once for the clip;
  - every frame starts from the same z_T (the same seed);
and frame k differs from frame k−1 only through the query's coefficients, hence I_R and f_r. A
static clip gives one output repeated exactly. Chosen by measurement (docs/driving.md):
  - smoothing (σ > 0): the query's estimated coefficients c_k (expression ψ, pose θ, light l,
    cam c) averaged over neighbouring frames with Gaussian weights, before rendering I_R:
        c̃_k = c_k + Σ_{|d|≤r} w_{k,d}·(c_{k+d} − c_k),   w_{k,d} ∝ exp(−d²/2σ²),  r = ⌈3σ⌉,
    the weights of frames inside the clip summing to 1 (written as a sum of differences so
    that equal coefficients stay exactly equal). Rotation vectors are averaged as vectors: close
    to averaging rotations for the small changes between neighbouring frames.

Flicker (`flicker`): the change from frame to frame that the target does not have,
    flicker = mean_{k, pixels, channels} |(O_{k+1} − O_k) − (T_{k+1} − T_k)|
for outputs O and targets T (N, 3, H, W) in [-1, 1]; 0 when the output moves exactly as the
target, and for any repeated output of a static target.

Writing (`write_gif`, `write_frames`): an animated GIF with Pillow, one palette for the whole
clip; PNG frames named as vox-png's, so an output folder can drive again.

Letters: N frames, H/W image size, S the model's image size.
"""
import math
import os
import re
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageSequence, UnidentifiedImageError
from tqdm import tqdm

from runtime.images import ImageError, from_pil, load_image, save_image, to_pil
from difffae import EDIT_ATTRIBUTES, edit_coefficients

MIN_FRAMES = 2          # a clip of one frame is a still: sample.py SRC QRY edits it
GIF_COLOURS = 256       # the most a GIF palette holds
PALETTE_FRAMES = 64     # frames the clip's palette is chosen from, evenly spaced
SMOOTH_RADIUS = 3       # the Gaussian window reaches ⌈3σ⌉ frames each side
SMOOTH_SIGMA = 1.0      # --smooth's default: less flicker, the same PSNR (docs/driving.md)
FPS = 25.0              # VoxCeleb's frame rate (Nagrani et al. 2017)


# -- Reading a clip --------------------------------------------------------------------------

def natural_key(name):
    """Sort key of a file name with its runs of digits compared as numbers: "f2" < "f10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _folder_frames(folder, size):
    """(N, 3, S, S) from the visible files of `folder`, in natural_key order."""
    names = sorted((entry.name for entry in os.scandir(folder)
                    if entry.is_file() and not entry.name.startswith(".")), key=natural_key)
    if not names:
        raise ImageError(f"{folder}: no frames (no files in the folder); expected the image "
                         f"files of a clip")
    if len(names) < MIN_FRAMES:
        raise ImageError(f"{folder}: a clip of one frame; expected at least {MIN_FRAMES} "
                         f"(for a still: sample.py SRC QRY)")
    frames, first = [], None
    for name in names:
        path = os.path.join(folder, name)
        with warnings.catch_warnings():
            if first is not None:  # the first frame's warning (an enlargement) is all frames'
                warnings.simplefilter("ignore")
            frames.append(load_image(path, size))  # ImageError for a file that is no image
        with Image.open(path) as opened:
            if first is None:
                first = (path, opened.size)
            elif opened.size != first[1]:
                raise ImageError(f"{path}: {opened.width}x{opened.height}, but the clip's first "
                                 f"frame {first[0]} is {first[1][0]}x{first[1][1]}; expected "
                                 f"frames of one size")
    return torch.stack(frames)


def _animation_frames(path, size):
    """(N, 3, S, S) from the frames of an animated image file (GIF, APNG, WebP)."""
    try:
        with Image.open(path) as opened:
            count = getattr(opened, "n_frames", 1)
            if count < MIN_FRAMES:
                raise ImageError(f"{path}: a clip of one frame; expected at least {MIN_FRAMES} "
                                 f"(an animated GIF, or a folder of frames)")
            frames = [from_pil(frame.convert("RGBA"), size)
                      for frame in ImageSequence.Iterator(opened)]
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file; expected a folder of frames or an "
                         f"animated GIF") from None
    except Exception as error:  # truncated or corrupt data, as load_image reports it
        raise ImageError(f"{path}: cannot decode frames ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None
    return torch.stack(frames)


def read_clip(path, size):
    """A clip as (N, 3, S, S) float32 in [-1, 1], N ≥ 2, S = size (module docstring); ImageError
    with one line naming the file and the problem when it cannot be one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _folder_frames(path, size)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file or folder; expected a folder of frames or an "
                         f"animated GIF")
    return _animation_frames(path, size)


# -- Driving ---------------------------------------------------------------------------------

def smooth(values, sigma):
    """c̃_k = c_k + Σ_{|d|≤r} w_{k,d}·(c_{k+d} − c_k) over the first dimension (N, ...), Gaussian
    weights of standard deviation sigma frames, normalised over the frames inside the clip
    (module docstring). sigma = 0 returns the values unchanged."""
    if sigma == 0:
        return values
    n = len(values)
    k = torch.arange(n, device=values.device)
    change = torch.zeros_like(values)
    total = torch.zeros(n, dtype=values.dtype, device=values.device)
    for d in range(-math.ceil(SMOOTH_RADIUS * sigma), math.ceil(SMOOTH_RADIUS * sigma) + 1):
        inside = ((k + d >= 0) & (k + d < n)).to(values.dtype)  # (N,)
        weight = math.exp(-d * d / (2 * sigma * sigma)) * inside
        neighbour = values[(k + d).clamp(0, n - 1)]  # (N, ...) c_{k+d}
        change += weight.view(-1, *[1] * (values.dim() - 1)) * (neighbour - values)
        total += weight
    return values + change / total.view(-1, *[1] * (values.dim() - 1))


def estimate(model, frames, sigma=0.0, refine_steps=None):
    """The estimator's coefficients of each frame, refined by refine_steps steps of the
    photometric fit (DiffFAE.fit_coefficients; None: the model's default), one frame at a
    time (so that a frame's estimate does not depend on the others in a batch), then smoothed
    over time by sigma frames.
    Returns a dict of (N, ...) tensors (estimator.CoefficientEstimator's keys)."""
    estimates = [model.fit_coefficients(frames[k:k + 1], refine_steps)
                 for k in range(len(frames))]
    return {key: smooth(torch.cat([e[key] for e in estimates]), sigma) for key in estimates[0]}


@torch.no_grad()
def drive(model, source, frames, edit=EDIT_ATTRIBUTES, swap=None, numbers=None, steps=None,
          sampler=None, seed=0, eta=0.0, sigma=0.0, same_noise=True, refine_steps=None,
          progress=False):
    """The source person (1, 3, S, S) driven by `frames` (N, 3, S, S): frame k is the query of
    an edit (DiffFAE.edit's arguments), all frames sharing the source's conditions and, with
    same_noise, the initial noise of `seed` (else frame k uses seed + k, the frames edited
    independently); sigma smooths the query's coefficients over time (module docstring).
    Returns {"image", "render" (I_R)}: (N, 3, S, S) each. progress: a bar over the frames."""
    assert source.shape[0] == 1 and frames.dim() == 4, (source.shape, frames.shape)
    source_estimate = model.fit_coefficients(source, refine_steps)
    query = estimate(model, frames, sigma, refine_steps)
    cond, images, renders = None, [], []
    for k in tqdm(range(len(frames)), desc="frames", unit="frame", disable=not progress):
        coefficients = edit_coefficients(
            source_estimate, {key: value[k:k + 1] for key, value in query.items()}, edit, numbers)
        rendered, _ = model.render(coefficients)
        if cond is None:  # the source's slot tokens F and f_id: once for the clip
            cond = model.swap_slots(model.conditions(source, rendered), swap)
        else:  # only f_r changes from frame to frame
            cond = {**cond, "f_r": model.encode_latent(rendered)}
        latent = model.sample(cond, steps, sampler, seed if same_noise else seed + k, eta)
        images.append(model.decode_latent(latent))
        renders.append(rendered)
    return {"image": torch.cat(images), "render": torch.cat(renders)}


def flicker(outputs, targets):
    """mean |(O_{k+1} − O_k) − (T_{k+1} − T_k)| over consecutive frames, pixels and channels of
    outputs O and targets T (N, 3, H, W), N ≥ 2 (module docstring). Returns a float64 scalar."""
    assert outputs.shape == targets.shape and len(outputs) >= MIN_FRAMES, outputs.shape
    change = outputs.double().diff(dim=0) - targets.double().diff(dim=0)  # (N − 1, 3, H, W)
    return change.abs().mean()


# -- Writing ---------------------------------------------------------------------------------

def write_gif(images, path, fps):
    """An animated GIF, looping, of (3, H, W) images in [-1, 1] at `fps` frames a second (GIF
    keeps hundredths of a second). One palette for the whole clip, chosen from up to
    PALETTE_FRAMES frames, and no dithering: a palette per frame, or dither noise, would make a
    still area flicker in the file itself. Pillow stores identical consecutive frames once."""
    pictures = [to_pil(image) for image in images]
    chosen = pictures[::max(1, len(pictures) // PALETTE_FRAMES)]
    width, height = pictures[0].size
    sheet = Image.new("RGB", (width, height * len(chosen)))  # the frames stacked
    for k, picture in enumerate(chosen):
        sheet.paste(picture, (0, k * height))
    palette = sheet.quantize(GIF_COLOURS, dither=Image.Dither.NONE)
    frames = [picture.quantize(palette=palette, dither=Image.Dither.NONE) for picture in pictures]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 / fps))


def write_frames(images, folder):
    """Each (3, H, W) image as folder/<frame:07d>.png, exactly (8-bit PNG, save_image)."""
    for k, image in enumerate(images):
        save_image(image, Path(folder) / f"{k:07d}.png")


# -- sample.py --drive -----------------------------------------------------------------------------

def check_options(args):
    """sample.py --drive's options, checked before any work; the defaults of --smooth and
    --fps filled in."""
    if args.query is not None:
        raise ValueError(f"{args.query}: give a query image or --drive CLIP, not both")
    if args.explain:
        raise ValueError("--explain draws one edit; it cannot be used with --drive")
    if args.frames and Path(args.frames).exists() and not Path(args.frames).is_dir():
        raise ValueError(f"--frames {args.frames}: a file; expected a folder")
    args.smooth = SMOOTH_SIGMA if args.smooth is None else args.smooth
    args.fps = FPS if args.fps is None else args.fps
    if not (math.isfinite(args.smooth) and args.smooth >= 0):
        raise ValueError(f"--smooth {args.smooth}: expected a number of frames >= 0")
    if not (math.isfinite(args.fps) and 1 <= args.fps <= 100):
        raise ValueError(f"--fps {args.fps}: expected 1 to 100 (a GIF keeps 1/100 s)")


def drive_program(args, model, source, attributes, swap, numbers, zoom):
    """sample.py --drive: the source driven by every frame of the clip, written as a GIF (and
    with --frames as PNGs), each frame enlarged by zoom(image, args.zoom). Returns the number of
    frames."""
    frames = read_clip(args.drive, model.image_size).to(args.device)
    result = drive(model, source, frames, attributes, swap, numbers, args.steps, args.sampler,
                   args.seed, args.eta, args.smooth, refine_steps=args.refine, progress=True)
    images = result["image"].cpu()
    if args.panel:  # source | driving frame | I_R | result, each frame
        images = torch.cat([source.cpu().expand_as(images), frames.cpu(),
                            result["render"].cpu(), images], dim=3)  # (N, 3, H, 4·W)
    images = [zoom(image, args.zoom) for image in images]
    write_gif(images, args.out, args.fps)
    if args.frames:
        write_frames(images, args.frames)
    return len(images)
