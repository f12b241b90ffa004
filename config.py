"""The training configuration: TrainConfig, the presets, and the command line of train.py.

One dataclass per part (TrainConfig here, VQConfig, SlotsConfig, ... beside their networks;
checkpoint.PARTS says which a stage builds); a preset is, per stage, a dict of overrides of each.
`--key=value` (or `--key value`) sets a TrainConfig field, `--part.key=value` a part's
(`--vqvae.codebook_size=64`), parsed to the field's type. `--help` is made from the fields
themselves (types, the preset's defaults, their comments), so it cannot drift from them; a bad
value is refused in one line before any work.
"""
import argparse
import dataclasses
import inspect
import math
import re

import stages
from checkpoint import PARTS


class ConfigError(ValueError):
    """A bad command-line value or key."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of the loop (the model parts have their own dataclasses)."""
    stage: str = "vqvae"
    preset: str = "tiny"
    data: str = "synthetic"       # "synthetic" or a folder in the vox-png layout
    out: str = "runs"             # checkpoints go to <out>/<stage>/ckpt.pt (folders made)
    tag: str = ""                 # a variant's checkpoints go to <out>/<stage>-<tag>/ instead
    export: str = ""              # write the ldm checkpoint's inference weights here and exit
    image_size: int = 64
    batch_size: int = 32          # in all: each of N processes takes batch_size / N
    steps: int = 3000             # the run ends at this step; a rerun resumes and goes on to it
    lr: float = 2e-4
    warmup: int = 100             # linear learning-rate warm-up steps
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 500
    ckpt_every: int = 250
    seed: int = 0
    pool: int = 6000              # synthetic pairs rendered once and cached; 0: render as drawn
    identities: int = 2000        # synthetic identities the pool cycles through
    eval_items: int = 128         # held-out synthetic items used for the measurements
    num_workers: int = 0
    bf16: bool = True             # autocast to bfloat16 on CUDA
    bf16_cpu: bool = False        # also on the CPU: the same code path, to test it without a GPU
    ema_decay: float = 0.0        # EMA of the trained weights; 0 keeps none
    # stage options
    slots_supervision: float = 0.0  # slots, ldm: weight of a mask loss on true regions (no paper)
    slots_weight: float = 0.0     # ldm: weight of the slots stage's loss, kept on (no paper)
    slots_tag: str = ""           # ldm: start from the slots stage's run of this --tag
    photometric_weight: float = 1.0  # estimator: weight of the re-rendering loss
    arcface_scale: float = 30.0   # identity: ArcFace s (the paper's 64 suits 85k classes)
    arcface_margin: float = 0.5   # identity: ArcFace m (Deng et al. 2019)
    face_only: bool = False       # identity: embed the face alone (evaluate.py's CSIM judge)

    def __post_init__(self):  # before any work: a bad value is one line, not a late traceback
        least = {"image_size": 8, "batch_size": 1, "steps": 1, "log_every": 1, "eval_every": 1,
                 "ckpt_every": 1, "identities": 1, "eval_items": 1, "warmup": 0, "pool": 0,
                 "num_workers": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"--{name}={getattr(self, name)}: expected an integer >= {low}")
        for name in ("lr", "grad_clip", "arcface_scale", "slots_supervision", "slots_weight",
                     "photometric_weight", "arcface_margin", "ema_decay"):
            value, positive = getattr(self, name), name in ("lr", "grad_clip", "arcface_scale")
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                sign = "positive" if positive else "non-negative"
                raise ConfigError(f"--{name}={value}: expected a {sign} number")
        if self.ema_decay >= 1:
            raise ConfigError(f"--ema_decay={self.ema_decay}: expected a value below 1")


# Presets: per stage, overrides of TrainConfig ("train") and of the stage's part config.
PRESETS = {
    "tiny": {
        # 24.6 dB on held-out 64 px images (2,500 steps and 512 codes: 23.5; 32 base channels
        # ran about 3× slower a step on the 2-core CPU)
        "vqvae": {"train": {"steps": 6000, "batch_size": 8, "lr": 4e-4},
                  "vqvae": {"base_channels": 16, "channel_mult": (1, 2, 4), "num_res_blocks": 1,
                            "norm_groups": 8, "codebook_size": 1024, "restart_every": 25,
                            "disc_start": 10 ** 9}},
        # unsupervised slots reached mIoU 0.29 in this budget, region-supervised 0.89 (README):
        # the tiny preset supervises them (not in the paper; the paper preset does not)
        "slots": {"train": {"steps": 2500, "batch_size": 8, "lr": 4e-4, "slots_supervision": 1.0},
                  "slots": {"image_size": 64, "base_channels": 16, "channel_mult": (1, 2, 4),
                            "num_res_blocks": 1, "norm_groups": 8, "attn_heads": 4,
                            "feature_dim": 64, "slot_dim": 64, "mlp_hidden": 128,
                            "decoder_channels": 32, "decoder_layers": 3}},
        "estimator": {"train": {"steps": 8000, "batch_size": 8, "lr": 4e-4},
                      "estimator": {"image_size": 64, "base_channels": 48, "norm_groups": 8}},
        # ArcFace's s = 64, m = 0.5 suit 85k classes; with 2,000 synthetic identities seen a few
        # times each, m = 0.5 left the embeddings in a narrow cone (README, measured)
        "identity": {"train": {"steps": 2000, "batch_size": 16, "lr": 4e-4,
                               "arcface_scale": 16.0, "arcface_margin": 0.2},
                     "identity": {"image_size": 64, "base_channels": 16, "norm_groups": 8,
                                  "embedding_dim": 128}},
        # the slots stage's loss kept on: without it the fixed-binding slot mIoU fell from 0.90 to
        # 0.66 in 2,000 steps; Min-SNR weights (γ = 5) led the paper's plain loss by 0.3-0.4 dB
        # at 1k-4k steps (README)
        "ldm": {"train": {"steps": 16000, "batch_size": 8, "lr": 4e-4, "ema_decay": 0.999,
                          "eval_every": 1000, "eval_items": 64, "slots_weight": 1.0,
                          "slots_supervision": 1.0},
                "unet": {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                         "attention_resolutions": (1, 2, 4), "head_channels": 32,
                         "norm_groups": 16},
                "diffusion": {"sample_steps": 20, "sampler": "dpm++2m", "min_snr_gamma": 5.0}},
    },
    "paper": {  # DiffFAE §5.1: Adam, lr 1e-4, batch 16 (over all GPUs), 256 px; LDM's EMA
        stage: {"train": {"image_size": 256, "batch_size": 16, "lr": 1e-4, "steps": 100_000,
                          "pool": 0, "eval_every": 5000, "ckpt_every": 1000,
                          "ema_decay": 0.9999 if stage == "ldm" else 0.0}}
        for stage in stages.STAGES
    },
}


def _refuse(message):
    raise ConfigError(message)


def _parse_value(text, current, key):
    """Parses `text` to the type of the field's current value."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, tuple):
            return tuple(type(current[0])(t) for t in text.strip("()").split(",") if t.strip())
        return type(current)(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected {type(current).__name__}") from None


def field_comments(cls):
    """{field: its trailing comment} from the dataclass's source, the help of its option: read
    from the fields themselves, so that --help cannot drift from them."""
    pattern = re.compile(r"\s+(\w+): [^=#]+=[^#]*#\s*(.+)")
    return {m[1]: m[2] for m in map(pattern.match, inspect.getsource(cls).splitlines()) if m}


def make_parser(train, parts):
    """The command line: --stage, --preset, then every field of TrainConfig (--key) and of the
    parts (--part.key), each with its type and its default in `train` and `parts`."""
    parser = argparse.ArgumentParser(
        usage="train.py --stage STAGE [--preset PRESET] [--key=value ...] [--part.key=value ...]",
        description="Trains one stage of DiffFAE; rerunning the command resumes it.",
        allow_abbrev=False,
        epilog="Every option takes --key=value or --key value. Defaults are the preset's for the "
               "stage given (`--stage ldm --help`); without --stage, the dataclasses' own.")
    parser.error = _refuse  # one line, no usage
    parser.add_argument("--stage", choices=stages.STAGES, required=True)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="default tiny")
    for prefix, config in [("", train), *((f"{name}.", c) for name, c in parts.items())]:
        group = parser.add_argument_group(f"--{prefix or ''}KEY ({type(config).__name__})")
        comments = field_comments(type(config))
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if field.name in ("stage", "preset"):
                continue
            kind = type(value[0]).__name__ + ",..." if isinstance(value, tuple) else \
                type(value).__name__
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)
            help_text = f"{comments.get(field.name, '')} (default {shown})".lstrip()
            group.add_argument(f"--{prefix}{field.name}", metavar=kind.upper(),
                               help=help_text.replace("%", "%%"))
    return parser


def build_configs(argv):
    """Parses argv (`--key=value` or `--key value`) into (TrainConfig, {part: part config}): the
    stage's preset, then the options given, each parsed to its field's type."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--stage", choices=stages.STAGES)
    first.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    first.error = _refuse
    known, _ = first.parse_known_args(argv)
    if known.stage is None:  # an error, or --help: then every stage's options
        train, parts = TrainConfig(), {name: cls() for part in PARTS.values()
                                       for name, cls in part.configs.items()}
    else:
        preset = PRESETS[known.preset][known.stage]
        train = dataclasses.replace(TrainConfig(stage=known.stage, preset=known.preset),
                                    **preset.get("train", {}))
        parts = {name: cls(**preset.get(name, {}))
                 for name, cls in PARTS[known.stage].configs.items()}
    args, unknown = make_parser(train, parts).parse_known_args(argv)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key for the {train.stage} stage; "
                          f"`python train.py --stage {train.stage} --help` lists the known ones")
    for key, text in vars(args).items():
        part, _, field = key.rpartition(".")
        if text is None or key in ("stage", "preset"):
            continue
        if part:
            value = _parse_value(text, getattr(parts[part], field), key)
            parts[part] = dataclasses.replace(parts[part], **{field: value})
        else:
            train = dataclasses.replace(train, **{field: _parse_value(text, getattr(train, field),
                                                                      key)})
    return train, parts
