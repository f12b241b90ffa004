"""What the programs (sample.py, tools/evaluate.py, tools/bench.py) share on the command line:
the bundled model's path, one-line errors with exit status 2, a parser that takes `--multi-word`
and `--multi_word` alike, the checks of arguments that must fail before any long work
(device, output files, sampling options, checkpoints), and sample.py's parsers of an edit's
attributes, region swaps and numbers.
"""
import argparse
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from assets.head import EXPRESSION_NAMES
from assets.synthetic import NUMBER_RANGES
from difffae import EDIT_ATTRIBUTES, NUMBERS
from layers import REGION_NAMES

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "difffae-tiny.pt"
SWAPPABLE = REGION_NAMES[1:]  # the face is what the edit changes
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def fail(message):
    """A command-line error: one line on stderr and exit status 2, as argparse's own."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage) and both spellings of multi-word options:
    `--judge_estimator` is read as `--judge-estimator`, as train.py's underscores are."""

    def error(self, message):
        fail(message)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([hyphenated(arg) for arg in args], namespace)


def hyphenated(arg):
    """`--a_b=c_d` → `--a-b=c_d`: the option's name only, never its value or a positional."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


def run(main):
    """Runs a program's main(); Ctrl-C ends it with one line and status 130, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)


def check_device(name):
    """--device: one this machine has, refused now rather than deep inside torch later."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or mps")
    count = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type in count and (device.index or 0) >= count[device.type]:
        raise ValueError(f"--device {name}: this machine has {count[device.type] or 'no'} "
                         f"{device.type} device(s) (torch {torch.__version__})")


def check_output(path, option, suffix=None):
    """An output file name, checked before the work that fills it: not a folder, the right
    suffix, and a place this process can write to (missing folders are made later)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: a directory; expected a file name")
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{option} {path}: expected a {suffix} file name")
    folder = path.absolute().parent
    while not folder.exists():  # the nearest folder that exists is where the new ones go
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: the file exists and cannot be overwritten")
    try:  # a real write: permissions, read-only file systems and full quotas alike
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise ValueError(f"{option} {path}: cannot write in the folder {folder}") from None


def check_sampling(model, steps, sampler, eta=0.0):
    """The sampling options against the model's diffusion (sampler=None: the model's own)."""
    timesteps = model.diffusion.timesteps
    if steps is not None and not 1 <= steps <= timesteps:
        raise ValueError(f"--steps {steps}: expected 1..{timesteps}")
    if not 0 <= eta <= 1:
        raise ValueError(f"--eta {eta}: expected a value in [0, 1]")
    if eta and (sampler or model.diffusion.sampler) != "ddim":
        raise ValueError(f"--eta {eta}: applies to the ddim sampler only (dpm++2m is "
                         f"deterministic)")


def check_temperature(temperature):
    """--temperature: None (the model's own) or a number >= 0."""
    if temperature is not None and not 0 <= temperature < float("inf"):
        raise ValueError(f"--temperature {temperature}: expected a number >= 0")


def set_temperature(model, temperature):
    """--temperature, if given, as the model's sampling temperature (DiffFAE.sample)."""
    if temperature is not None:
        model.diffusion.temperature = temperature


def read_checkpoint(load, path, option, *args):
    """load(path, *args) with any problem of the file as one line naming the option and the file
    (load raises ValueError '<file>: <problem>')."""
    try:
        return load(path, *args)
    except ValueError as error:
        raise ValueError(f"{option} {error}") from None


# -- sample.py's edit options -------------------------------------------------------------------

NUMBER_HELP = ("yaw, pitch, roll, jaw in degrees; light=x,y,z (a direction in camera space: "
               "+x to the image's right, +y up, +z towards the camera); or an expression name "
               "of the built-in head = its coefficient (e.g. smile=1.2)")


def parse_swap(items):
    """["hair=a.png", ...] → {"hair": "a.png", ...}."""
    swap = {}
    for item in items:
        region, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--swap {item}: expected REGION=IMAGE, e.g. hair=other.png")
        if region not in SWAPPABLE:
            raise ValueError(f"cannot swap {region!r}: expected one of {', '.join(SWAPPABLE)}")
        if region in swap:
            raise ValueError(f"--swap {region} given twice ({swap[region]}, {path}): give each "
                             f"region once")
        swap[region] = path
    return swap


def parse_numbers(items):
    """["yaw=20", "light=1,0,1", ...] → {"yaw": 20.0, "light": [1.0, 0.0, 1.0], ...}."""
    known = (*NUMBERS, *EXPRESSION_NAMES)
    numbers = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--set {item}: expected NAME=NUMBER or light=X,Y,Z") from None
        if name not in known:
            raise ValueError(f"unknown number {name!r}: expected one of {', '.join(known)}")
        if name in numbers:
            raise ValueError(f"--set {name} given twice: give each number once")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"--set {item}: expected a finite number")
        light = name == "light"
        if len(values) != (3 if light else 1) or (light and not any(values)):
            raise ValueError(f"--set {item}: expected NAME=NUMBER or light=X,Y,Z (not 0,0,0)")
        numbers[name] = values if light else values[0]
        low, high = NUMBER_RANGES.get(name, (-math.inf, math.inf))
        if not low <= values[0] <= high:
            warnings.warn(f"--set {item}: outside what the synthetic portraits hold "
                          f"({low:g} to {high:g}): a model trained on them never saw "
                          f"such a face")
    return numbers


def parse_edit(text):
    attributes = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in attributes if a not in EDIT_ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"--edit {text}: expected a comma-separated subset of "
                         f"{','.join(EDIT_ATTRIBUTES)}")
    return attributes
