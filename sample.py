"""Edit a portrait: `python sample.py SRC QRY` writes the SRC person with QRY's pose, expression
and lighting (DiffFAE, Wang et al. 2024, §4). Region swaps are the paper's expandable editing
(App. G); editing by numbers is not in the paper.

    python sample.py examples/src.png examples/qry.png                    # → out.png
    python sample.py SRC QRY --edit expression --panel                    # only the expression
    python sample.py SRC QRY --swap hair=other.png                        # and another's hair
    python sample.py SRC --set yaw=25 --set jaw=15 --set light=1,0,1      # edit by numbers
    python sample.py SRC QRY --sampler ddim --steps 50     # not the model's own sampler and steps
    python sample.py SRC QRY --refine 20   # coefficients refined through the renderer
    python sample.py SRC QRY --explain fig.png       # and a figure of what each part did
    python sample.py SRC --drive CLIP --out out.gif  # every frame of a clip a query

The model is the bundled one (weights/difffae-tiny.pt, trained on synthetic 64 px portraits)
unless --ckpt names another: an exported file or a `runs/ldm/ckpt.pt` training checkpoint (its
EMA weights). Images are centre-cropped and resized to the model's size; with --panel the output
is a strip source | query | I_R (the rendered face) | result; --explain also draws the edit's
own tensors, row by row (tools/explain.py). With --drive, CLIP (a folder of frames, a vox-png
clip folder or an animated GIF) takes the query's place frame by frame and the output is a GIF;
the other options apply to every frame. Runs on the CPU, with one thread unless OMP_NUM_THREADS
says otherwise: two threads spin-wait on a shared 2-core machine (docs/timings.md).
"""
import argparse
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from difffae import EDIT_ATTRIBUTES
from runtime.checkpoint import load_model
from runtime.cli import (DEFAULT_CHECKPOINT, NUMBER_HELP, Parser, check_device, check_output,
                         check_sampling, check_temperature, fail, parse_edit, parse_numbers,
                         parse_swap, read_checkpoint, run, set_temperature)
from runtime.images import MAX_SIZE, ImageError, load_image, save_image
from samplers import SAMPLERS

MAX_REFINE = 1000  # steps of the fit; it settles within 300 (docs/fitting.md)


def zoom(image, factor):
    """Nearest-neighbour enlargement of a (3, H, W) image, for looking at 64 px results."""
    if factor == 1:
        return image
    return F.interpolate(image[None], scale_factor=factor, mode="nearest")[0]


def arguments():
    """sample.py's command line."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the person to edit (any image Pillow reads)")
    parser.add_argument("query", nargs="?", help="whose pose / expression / lighting to take")
    parser.add_argument("--out", help="output PNG, or GIF with --drive (default out.png, "
                        "out.gif; missing folders are made)")
    parser.add_argument("--ckpt", default=str(DEFAULT_CHECKPOINT),
                        help="model file (default: the bundled weights/difffae-tiny.pt)")
    parser.add_argument("--edit", default=",".join(EDIT_ATTRIBUTES),
                        help="attributes taken from the query (default: all three)")
    parser.add_argument("--swap", action="append", default=[], metavar="REGION=IMAGE",
                        help="take hair, clothes or background from another image (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        dest="numbers", help=f"edit by numbers (repeatable): {NUMBER_HELP}")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the "
                        "model's, 20 for the bundled one)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="(default: the model's, dpm++2m for the bundled one)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 "
                        "ancestral")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (no effect "
                        "at temperature 0)")
    parser.add_argument("--temperature", type=float, default=None, metavar="TAU",
                        help="scale of the initial noise: below 1 an edit keeps closer to what "
                        "it is handed, 0 makes it the same for every seed (default: the "
                        "model's, 1 for the bundled one)")
    parser.add_argument("--refine", type=int, default=None, metavar="N",
                        help="refine the estimator's coefficients: to its detector's landmarks if "
                        "it has one, then N steps of the photometric fit through the renderer "
                        "(fitting/fit.py; default: the model's own, 0, the estimator alone, "
                        "unless it was trained on refined renders: see docs/fitting.md)")
    parser.add_argument("--panel", action="store_true",
                        help="write source | query | I_R | result instead of the result alone")
    parser.add_argument("--explain", metavar="FIG", help="also write FIG, a PNG of what SPC, RSC, "
                        "ACR and the sampler did in this edit")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge the output N× (nearest)")
    parser.add_argument("--drive", metavar="CLIP", help="a clip instead of a query: a folder "
                        "of frames (name order), a vox-png clip folder or an animated GIF")
    parser.add_argument("--frames", metavar="DIR", help="with --drive, also write the output "
                        "frames as DIR/<frame:07d>.png")
    parser.add_argument("--smooth", type=float, metavar="SIGMA",
                        help="with --drive, smooth the query's coefficients over SIGMA frames "
                        "(default 1; 0: none)")
    parser.add_argument("--fps", type=float, help="with --drive, the GIF's frames a second "
                        "(default 25)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    return parser


def check_arguments(args):
    """Every argument that needs no model, checked before loading one; returns the edit's
    attributes, the swap images' paths and the numbers."""
    check_device(args.device)
    check_temperature(args.temperature)
    if args.drive:
        from tools import drive  # a tool beside the edit: the clip, its smoothing, the GIF
        drive.check_options(args)
    else:
        for option in ("frames", "smooth", "fps"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option} {getattr(args, option)}: an option of --drive; "
                                 f"give a clip")
    args.out = args.out or ("out.gif" if args.drive else "out.png")
    check_output(args.out, "--out", ".gif" if args.drive else ".png")
    if args.query is None and not (args.drive or args.numbers):
        raise ValueError("nothing to edit: give a query image, --drive CLIP or --set NAME=VALUE")
    if args.zoom < 1:
        raise ValueError(f"--zoom {args.zoom}: expected a positive integer")
    if args.refine is not None and not 0 <= args.refine <= MAX_REFINE:
        raise ValueError(f"--refine {args.refine}: expected 0 to {MAX_REFINE} steps")
    if args.explain:
        check_output(args.explain, "--explain", ".png")
    return parse_edit(args.edit), parse_swap(args.swap), parse_numbers(args.numbers)


def edit(args, attributes, swap_paths, numbers):
    """Loads the model and the images, edits, and writes --out (and --explain)."""
    model = read_checkpoint(load_model, args.ckpt, "--ckpt", args.device)
    check_sampling(model, args.steps, args.sampler, args.eta)
    set_temperature(model, args.temperature)
    side = args.zoom * model.image_size * (4 if args.panel else 1)
    if side > MAX_SIZE:
        raise ValueError(f"--zoom {args.zoom}: the output would be {side} px wide; expected at "
                         f"most {MAX_SIZE}")
    bundled = Path(args.ckpt).resolve() == DEFAULT_CHECKPOINT

    def read(path):
        image = load_image(path, model.image_size)[None].to(args.device)
        with Image.open(path) as opened:
            (width, height), kind = opened.size, opened.format
        if bundled and (width != height or kind != "PNG"):  # as the synthetic portraits are
            warnings.warn(f"{path} is a {width} × {height} {kind}, not a square PNG like the "
                          f"bundled model's synthetic portraits: it never saw a photograph, so "
                          f"expect a melted face (docs/real-data.md: training on real frames)")
        return image

    source = read(args.source)
    query = read(args.query) if args.query else None
    swap = {region: read(path) for region, path in swap_paths.items()}
    if args.drive:
        from tools import drive
        return drive.drive_program(args, model, source, attributes, swap, numbers, zoom)
    trace = {} if args.explain else None
    result = model.edit(source, query, edit=attributes, swap=swap, numbers=numbers,
                        steps=args.steps, sampler=args.sampler, seed=args.seed, eta=args.eta,
                        refine_steps=args.refine, trace=trace)
    if args.explain:
        from tools import explain  # a tool beside the edit: the figure of its tensors
        Path(args.explain).parent.mkdir(parents=True, exist_ok=True)
        explain.figure(model, trace, result, source, query, attributes, swap, numbers).save(
            args.explain)
    image = result["image"][0].cpu()
    if args.panel:
        strip = [source[0].cpu(), (query if query is not None else source)[0].cpu(),
                 result["render"][0].cpu(), image]
        image = torch.cat(strip, dim=2)  # (3, H, 4·W)
    save_image(zoom(image, args.zoom), args.out)


def main(argv=None):
    args = arguments().parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:  # one thread (the module docstring says why)
        torch.set_num_threads(1)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, no source
    started = time.time()
    try:
        frames = edit(args, *check_arguments(args))
    except (ImageError, ValueError, OSError) as error:
        fail(error)
    seconds = time.time() - started
    if frames:  # --drive: the time includes loading the model
        also = f" and {args.frames}" if args.frames else ""
        print(f"wrote {args.out}{also}: {frames} frames ({seconds:.1f} s, "
              f"{seconds / frames:.2f} s a frame)")
        return
    also = f" and {args.explain}" if args.explain else ""
    print(f"wrote {args.out}{also} ({seconds:.1f} s)")


if __name__ == "__main__":
    run(main)
