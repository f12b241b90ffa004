"""Checkpoint files of DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664): the registry of the
parts its training stages make, reading any checkpoint with one-line errors, rebuilding a part
from the config saved with it, and the exported inference file that sample.py loads.

Training checkpoints (train.py) are dicts {"stage", "step", "config": {part: dataclass fields},
"model": the stage's state dict, "optimizer", "rng", "ema": {"updates", "shadow"} or None}.
An exported model is one file {"format": INFERENCE_FORMAT, "step", "config", "weights"}: the
ldm stage's EMA weights in float16 without the optimiser, the RNG or the TRAINING_ONLY networks.
"""
from pathlib import Path
from typing import NamedTuple

import torch

from assets.flame_files import FlameModelError
from difffae import DiffFAE, DiffusionConfig
from estimator import CoefficientEstimator, EstimatorConfig, IdentityConfig, IdentityEncoder
from pretrained import WeightsError, install
from slots import RegionSlots, SlotsConfig
from unet import UNetConfig
from vqvae import VQConfig, VQVAE

INFERENCE_FORMAT = "difffae-inference-1"
TRAINING_ONLY = ("slots.decoder.",)  # ζ decodes the slots for the slots loss, never in an edit
# Config fields that no longer exist, with the one value the code now always has: a saved
# config holding that value still loads; another value is refused. None: any value loads (the
# settings of the VQ-VAE's adversarial training, no longer built, never shaped its network).
RETIRED = {("vqvae", "use_mid_attention"): True, ("diffusion", "use_identity"): True,
           **{("vqvae", name): None for name in ("disc_channels", "disc_layers", "disc_start",
                                                 "disc_weight")}}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: one line naming the file and the problem."""


class Part(NamedTuple):
    """What a training stage makes: its network class, its config classes {name: class}, the
    stages whose checkpoints it starts from, and its network's key prefix in the stage's state."""
    network: type
    configs: dict
    requires: tuple
    prefix: str


# The stages in training order; ldm's network is the whole method (its configs: the UNet's and
# the diffusion's, with the four parts' copied from their checkpoints).
PARTS = {"vqvae": Part(VQVAE, {"vqvae": VQConfig}, (), "vqvae."),
         "slots": Part(RegionSlots, {"slots": SlotsConfig}, ("vqvae",), "slots."),
         "estimator": Part(CoefficientEstimator, {"estimator": EstimatorConfig}, (), "estimator."),
         "identity": Part(IdentityEncoder, {"identity": IdentityConfig}, (), "encoder."),
         "ldm": Part(DiffFAE, {"unet": UNetConfig, "diffusion": DiffusionConfig},
                     ("vqvae", "slots", "estimator", "identity"), "model.")}
CONFIGS = {name: cls for part in PARTS.values() for name, cls in part.configs.items()}


def read_checkpoint(path, kinds=None):
    """The dict saved in `path`. kinds: the accepted values of its "format" (exported files) or
    "stage" (training checkpoints) entry; None accepts any. Raises CheckpointError: missing, a
    directory, truncated or not a PyTorch file, or of another kind."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip and unsafe-global errors alike
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a PyTorch "
                              f"file)") from None
    kind = isinstance(checkpoint, dict) and (checkpoint.get("format") or checkpoint.get("stage"))
    if kinds is not None and kind not in kinds:
        raise CheckpointError(f"{path}: a {kind or 'non-DiffFAE'} checkpoint; expected "
                              f"{' or '.join(map(_kind_name, kinds))}")
    return checkpoint


def _kind_name(kind):
    return "an exported model" if kind == INFERENCE_FORMAT else f"one of the {kind} stage"


def configs_of(checkpoint):
    """{name: config} of every part config saved with a checkpoint (training or exported):
    for an ldm checkpoint all six, vqvae, slots, estimator, identity, unet and diffusion."""
    configs = {}
    for name, fields in checkpoint["config"].items():
        if name not in CONFIGS:
            continue  # "train": the loop's options
        fields = dict(fields)
        for (part, field), kept in RETIRED.items():
            value = fields.pop(field, kept) if part == name else kept
            if kept is not None and value != kept:
                raise TypeError(f"{name}.{field}={value!r} is no longer supported")
        configs[name] = CONFIGS[name](**fields)
    return configs


def rebuild(checkpoint, stage):
    """The trained network of a `stage` checkpoint (vqvae, slots, estimator or identity), rebuilt
    from the config saved with it. Returns (network, its config)."""
    part = PARTS[stage]
    (name,) = part.configs
    config = configs_of(checkpoint)[name]
    network = part.network(config)
    network.load_state_dict({k[len(part.prefix):]: v for k, v in checkpoint["model"].items()
                             if k.startswith(part.prefix)})
    return network, config


# -- The exported model ----------------------------------------------------------------------------

def inference_weights(checkpoint):
    """The model's weights from an ldm training checkpoint, its EMA replacing trained ones,
    without the TRAINING_ONLY ones."""
    prefix = PARTS["ldm"].prefix
    weights = {k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)}
    for name, value in (checkpoint.get("ema") or {}).get("shadow", {}).items():
        weights[name[len(prefix):]] = value
    return {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY)}


def export_inference(checkpoint, path, dtype=torch.float16):
    """Writes the EMA weights of an ldm training checkpoint (a dict) in `dtype`, with the
    config, to one file: everything sample.py needs, nothing for training (no optimiser, no
    RNG)."""
    weights = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in inference_weights(checkpoint).items()}
    torch.save({"format": INFERENCE_FORMAT, "step": checkpoint["step"],
                "config": checkpoint["config"], "weights": weights}, path)


def load_model(path, device="cpu"):
    """DiffFAE from an exported inference file or an ldm training checkpoint (its EMA weights),
    in eval mode, float32; with DECA's and ArcFace's networks loaded again from the files it
    was trained with (--deca, --arcface: pretrained.install). Raises CheckpointError naming the
    file and the problem."""
    path = Path(path)
    checkpoint = read_checkpoint(path, (INFERENCE_FORMAT, "ldm"))
    if checkpoint.get("format") == INFERENCE_FORMAT:
        weights = checkpoint["weights"]
    else:
        weights = inference_weights(checkpoint)
    files = {option: checkpoint["config"].get("train", {}).get(option, "")
             for option in ("deca", "arcface")}  # the published networks it was trained with
    try:  # a part's config missing or refused, parts that do not fit, weights that do not load
        model = install(DiffFAE(configs_of(checkpoint)), **files)
        missing, unexpected = model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
            strict=False)
        missing = [k for k in missing if not k.startswith(TRAINING_ONLY)]
        if missing or unexpected:
            raise RuntimeError(f"missing weights {missing[:3]}, unexpected {unexpected[:3]}")
    except (WeightsError, FlameModelError) as error:  # a file named by --deca or --arcface
        raise CheckpointError(f"{path}: made with {error}") from None
    except (AssertionError, KeyError, TypeError, RuntimeError, ValueError) as error:
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise CheckpointError(f"{path}: incompatible with this model version ({first})") from None
    return model.to(device).eval()
