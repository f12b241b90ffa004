"""The training configuration: TrainConfig, the presets, and the command line of train.py.

One dataclass per part (TrainConfig here, VQConfig, SlotsConfig, ... beside their networks;
runtime.checkpoint.PARTS says which a stage builds); a preset is, per stage, a dict of overrides
of each.
`--stage all` runs every stage in order (STAGES); `--smoke=true` shrinks each to a few steps
at tiny sizes (SMOKE), to try the whole chain in minutes.
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

from runtime.checkpoint import PARTS

STAGES = tuple(PARTS)  # in training order


class ConfigError(ValueError):
    """A bad command-line value or key."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of the loop (the model parts have their own dataclasses)."""
    stage: str = "vqvae"          # one of STAGES, or "all": every stage in order, then --export
    preset: str = "tiny"
    smoke: bool = False           # every stage a few steps at tiny sizes: the chain in minutes
    data: str = "synthetic"       # "synthetic" or a folder in the vox-png layout
    out: str = "runs"             # checkpoints go to <out>/<stage>/ckpt.pt (folders made)
    tag: str = ""                 # a variant's checkpoints go to <out>/<stage>-<tag>/ instead
    export: str = ""              # the ldm checkpoint's inference weights are written here
    image_size: int = 64
    batch_size: int = 32          # in all: each of N processes takes batch_size / N
    steps: int = 3000             # the run ends at this step; a rerun resumes and goes on to it
    time_limit: float = 0.0       # seconds this run may train; then it checkpoints and ends (0: no
                                  # limit); a rerun goes on from there
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
    workers: int = 0              # processes rendering the pool or reading a folder's frames
    bf16: bool = True             # autocast to bfloat16 on CUDA
    bf16_cpu: bool = False        # also on the CPU: the same code path, to test it without a GPU
    ema_decay: float = 0.0        # EMA of the trained weights; 0 keeps none
    # stage options
    slots_supervision: float = 0.0  # slots: weight of a mask loss on true regions (not in the
                                  # paper)
    frozen_cache: bool = True     # ldm: the frozen parts' outputs computed once per pool pair
    frames_weight: float = 0.1    # estimator, --data=PATH: that loss's weight on the frames
    arcface_scale: float = 30.0   # identity: ArcFace s (the paper's 64 suits 85k classes)
    arcface_margin: float = 0.5   # identity: ArcFace m (Deng et al. 2019)
    face_only: bool = False       # identity: embed the face alone (tools/evaluate.py's CSIM judge)
    deca: str = ""                # ldm: DECA's deca_model.tar as the estimator, fixed, with FLAME
                                  # 2020 and its albedo from that folder (docs/real-data.md)
    arcface: str = ""             # ldm: arcface_torch's iresnet100 backbone.pth as the identity
                                  # encoder, fixed

    def __post_init__(self):  # before any work: a bad value is one line, not a late traceback
        least = {"image_size": 8, "batch_size": 1, "steps": 1, "log_every": 1, "eval_every": 1,
                 "ckpt_every": 1, "identities": 1, "eval_items": 1, "warmup": 0, "pool": 0,
                 "workers": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"--{name}={getattr(self, name)}: expected an integer >= {low}")
        for name in ("lr", "grad_clip", "arcface_scale", "slots_supervision", "frames_weight",
                     "arcface_margin", "ema_decay", "time_limit"):
            value, positive = getattr(self, name), name in ("lr", "grad_clip", "arcface_scale")
            if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
                sign = "positive" if positive else "non-negative"
                raise ConfigError(f"--{name}={value}: expected a {sign} number")
        if self.ema_decay >= 1:
            raise ConfigError(f"--ema_decay={self.ema_decay}: expected a value below 1")


# Presets: per stage, overrides of TrainConfig ("train") and of the stage's part config.
GPU_RUN = {"steps": 1_000_000, "pool": 16_000, "identities": 4000, "workers": 16,
           "log_every": 50, "eval_every": 10 ** 9, "ckpt_every": 1000}  # the time limit ends it
PRESETS = {
    "tiny": {
        # sized for a 2-core CPU; each choice below is measured in docs/ablations.md
        # the Laplacian detail term doubles the face's detail at 2,000 steps; 16,000 steps keep
        # 0.7 dB and 60 % more detail than 8,000; the face's pixels weigh 5x: +1.6 dB and 60 %
        # more detail on the face, eyes in every held-out face, for 0.5 dB on the whole image
        "vqvae": {"train": {"steps": 16000, "batch_size": 8, "lr": 4e-4},
                  "vqvae": {"base_channels": 16, "channel_mult": (1, 2, 4), "num_res_blocks": 1,
                            "norm_groups": 8, "codebook_size": 1024, "restart_every": 25,
                            "detail_weight": 1.0, "face_weight": 4.0}},
        # region-supervised slots (not in the paper): unsupervised ones do not separate the
        # regions in this budget
        "slots": {"train": {"steps": 2500, "batch_size": 8, "lr": 4e-4, "slots_supervision": 1.0},
                  "slots": {"image_size": 64, "base_channels": 16, "channel_mult": (1, 2, 4),
                            "num_res_blocks": 1, "norm_groups": 8, "attn_heads": 4,
                            "feature_dim": 64, "slot_dim": 64, "mlp_hidden": 128,
                            "decoder_channels": 32, "decoder_layers": 3}},
        # a landmark detector beside the regressor: the fit puts I_R 0.87 px from the face's
        # landmarks instead of 1.39 px (docs/fitting.md)
        "estimator": {"train": {"steps": 8000, "batch_size": 8, "lr": 4e-4},
                      "estimator": {"image_size": 64, "base_channels": 48, "norm_groups": 8,
                                    "n_landmarks": 68}},
        # ArcFace's s = 64, m = 0.5 suit 85k classes; a smaller margin suits 2,000 identities
        "identity": {"train": {"steps": 2000, "batch_size": 16, "lr": 4e-4,
                               "arcface_scale": 16.0, "arcface_margin": 0.2},
                     "identity": {"image_size": 64, "base_channels": 16, "norm_groups": 8,
                                  "embedding_dim": 128}},
        # the slots stage's loss kept on, so that the slots stay on their regions; Min-SNR
        # weights (γ = 5) instead of the paper's plain loss, with their x0-weight floored at 1
        # (+1.1 dB at 2,500 steps); half the pairs' I_R from the exact coefficients, so that
        # the UNet trusts I_R, and the other half's from the estimator's reading refined
        # through the renderer (+0.8 dB on the face, docs/fitting.md); v-prediction (+0.8 dB on
        # the edit), the face's latents weighted 5x (+1.3 dB on the face handed the exact
        # render) and sampling from z_T = 0 (+1.4 dB on the edit): docs/ablations.md
        "ldm": {"train": {"steps": 16000, "batch_size": 8, "lr": 4e-4, "ema_decay": 0.999,
                          "eval_every": 1000, "eval_items": 64},
                "unet": {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                         "attention_resolutions": (1, 2, 4), "head_channels": 32,
                         "norm_groups": 16},
                "diffusion": {"sample_steps": 20, "sampler": "dpm++2m", "min_snr_gamma": 5.0,
                              "snr_floor": 1.0, "truth_fraction": 0.5, "slots_weight": 1.0,
                              "slots_supervision": 1.0, "render_from": "refined",
                              "prediction": "v", "face_weight": 4.0, "temperature": 0.0}},
    },
    "paper": {  # DiffFAE §5.1: Adam, lr 1e-4, batch 16 (over all GPUs), 256 px; LDM's EMA
        stage: {"train": {"image_size": 256, "batch_size": 16, "lr": 1e-4, "steps": 100_000,
                          "pool": 0, "eval_every": 5000, "ckpt_every": 1000,
                          "ema_decay": 0.9999 if stage == "ldm" else 0.0}}
        for stage in STAGES
    },
    # One GPU, about five minutes of training in all: 64 px as the tiny preset, the networks
    # several times larger, large batches, bf16 autocast, the pool rendered by 16 processes,
    # and each stage stopped by its time limit (a rerun trains it on for as long again).
    "gpu": {
        # the face's pixels weigh 5x: +1.7 dB and 60 % more detail on the face at 16,000 CPU
        # steps, eyes in six faces of eight, for 0.5 dB on the whole image (docs/ablations.md)
        "vqvae": {"train": {**GPU_RUN, "batch_size": 64, "lr": 4e-4, "time_limit": 75},
                  "vqvae": {"base_channels": 64, "channel_mult": (1, 2, 4), "num_res_blocks": 2,
                            "norm_groups": 32, "codebook_size": 1024, "restart_every": 50,
                            "detail_weight": 1.0, "face_weight": 4.0}},
        "slots": {"train": {**GPU_RUN, "batch_size": 64, "lr": 4e-4, "time_limit": 30,
                            "slots_supervision": 1.0},
                  "slots": {"image_size": 64, "base_channels": 32, "channel_mult": (1, 2, 4),
                            "num_res_blocks": 1, "norm_groups": 16, "attn_heads": 4,
                            "feature_dim": 128, "slot_dim": 128, "mlp_hidden": 256,
                            "decoder_channels": 64, "decoder_layers": 3}},
        # a landmark detector beside the regressor, for the fit (docs/fitting.md)
        "estimator": {"train": {**GPU_RUN, "batch_size": 64, "lr": 4e-4, "time_limit": 50},
                      "estimator": {"image_size": 64, "base_channels": 64, "norm_groups": 16,
                                    "n_landmarks": 68}},
        "identity": {"train": {**GPU_RUN, "batch_size": 128, "lr": 4e-4, "time_limit": 15,
                               "arcface_scale": 16.0, "arcface_margin": 0.2},
                     "identity": {"image_size": 64, "base_channels": 32, "norm_groups": 16,
                                  "embedding_dim": 128}},
        # the tiny preset's diffusion settings (measured there) but the refined renders, whose
        # fits of the 16,000-pair pool are untimed on a GPU and could overrun the run's phase:
        # half the pairs with exact renders; v-prediction, the face weighted 5x, z_T = 0
        "ldm": {"train": {**GPU_RUN, "batch_size": 64, "lr": 2e-4, "time_limit": 150,
                          "ema_decay": 0.999, "eval_items": 64},
                "unet": {"base_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
                         "attention_resolutions": (2, 4), "head_channels": 32,
                         "norm_groups": 32},
                "diffusion": {"sample_steps": 20, "sampler": "dpm++2m", "min_snr_gamma": 5.0,
                              "snr_floor": 1.0, "truth_fraction": 0.5, "slots_weight": 1.0,
                              "slots_supervision": 1.0, "prediction": "v", "face_weight": 4.0,
                              "temperature": 0.0}},
    },
}

# --smoke=true: on top of the preset, every stage a few steps of tiny networks at 32 px, so
# that the whole chain, its export and an edit run on a CPU in a few minutes.
SMOKE_TRAIN = {"image_size": 32, "batch_size": 2, "steps": 3, "pool": 8, "identities": 4,
               "eval_items": 2, "log_every": 1, "eval_every": 1000, "ckpt_every": 1000,
               "warmup": 1, "time_limit": 0.0, "workers": 0}
SMALL_CNN = {"base_channels": 8, "norm_groups": 4}
SMOKE = {
    "vqvae": {"vqvae": {**SMALL_CNN, "channel_mult": (1, 2), "num_res_blocks": 1,
                        "codebook_size": 32}},
    "slots": {"slots": {**SMALL_CNN, "channel_mult": (1, 2), "num_res_blocks": 1,
                        "attn_heads": 2, "feature_dim": 16, "slot_dim": 16, "mlp_hidden": 32,
                        "decoder_channels": 8, "decoder_layers": 2}},
    "estimator": {"estimator": {**SMALL_CNN, "channel_mult": (1, 2)}},
    "identity": {"identity": {**SMALL_CNN, "channel_mult": (1, 2), "embedding_dim": 16}},
    "ldm": {"train": {"steps": 4, "eval_items": 2},
            "unet": {"base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                     "attention_resolutions": (2,), "head_channels": 8, "norm_groups": 8},
            "diffusion": {"sample_steps": 2, "refine_steps": 2}},
}


# Options of one stage alone: the others' command lines do not list them.
STAGE_ONLY = {"slots_supervision": "slots", "frames_weight": "estimator", "frozen_cache": "ldm",
              "arcface_scale": "identity", "arcface_margin": "identity", "face_only": "identity",
              "deca": "ldm", "arcface": "ldm"}
# The stages whose network the ldm stage can load from a published file instead, and the option
# naming that file (pretrained/): given the file, `--stage all` does not run the stage.
PRETRAINED = {"estimator": "deca", "identity": "arcface"}
# Fields that are not options: those a stage fills in from the data (the image size, FLAME's
# coefficient counts, the VQ latent's and the slots' shapes), and the noise schedule, LDM's as
# the paper's, which every model and sampler here is trained and tested with.
NOT_OPTIONS = {"slots": ("image_size", "target_channels", "target_size"),
          "estimator": ("image_size", "n_shape", "n_exp", "n_albedo"),
          "identity": ("image_size",),
          "unet": ("in_channels", "out_channels", "context_dim", "id_dim"),
          "diffusion": ("timesteps", "beta_start", "beta_end")}


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
        kind = "true or false (or 1, 0)" if isinstance(current, bool) else type(current).__name__
        raise ConfigError(f"--{key}={text}: expected {kind}") from None


def field_comments(cls):
    """{field: its trailing comment} from the dataclass's source, the help of its option: read
    from the fields themselves, so that --help cannot drift from them."""
    field = re.compile(r"\s+(\w+): [^=#]+=[^#]*#\s*(.+)")
    more = re.compile(r" {8,}#\s*(.+)")  # an indented comment line goes on the field's one
    comments, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := field.match(line):
            comments[m[1]] = m[2]
            last = m[1]
        elif last and (m := more.fullmatch(line)):
            comments[last] += " " + m[1]
        else:
            last = None
    return comments


def _shown(values):
    """An option's default as --help shows it: one value, or each stage's when they differ."""
    text = {stage: ",".join(map(str, v)) if isinstance(v, tuple) else repr(v)
            for stage, v in values.items()}
    if len(set(text.values())) == 1:
        return next(iter(text.values()))
    return "per stage: " + ", ".join(f"{stage} {value}" for stage, value in text.items())


def make_parser(trains, parts):
    """The command line: --stage, --preset, --smoke, then every field of TrainConfig (--key) and
    of the parts (--part.key), each with its type and its default: `trains` holds the
    TrainConfig of each stage to run, `parts` the part configs."""
    parser = argparse.ArgumentParser(
        usage="train.py --stage STAGE|all [--preset PRESET] [--smoke=true] [--key=value ...] "
              "[--part.key=value ...]",
        description="Trains one stage of DiffFAE, or all of them in order (--stage all, then "
                    "--export); rerunning the command resumes it.",
        allow_abbrev=False,
        epilog="Every option takes --key=value or --key value. Defaults are the preset's for the "
               "stage given (`--stage ldm --help`); without --stage, every stage's.")
    parser.error = _refuse  # one line, no usage
    parser.add_argument("--stage", choices=(*STAGES, "all"), required=True)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="default tiny")
    configs = [("", {t.stage: t for t in trains})]
    configs += [(f"{name}.", {name: c}) for name, c in parts.items()]
    for prefix, by_stage in configs:
        config = next(iter(by_stage.values()))
        group = parser.add_argument_group(f"--{prefix or ''}KEY ({type(config).__name__})")
        comments = field_comments(type(config))
        for field in dataclasses.fields(config):
            stage = STAGE_ONLY.get(field.name) if not prefix else None
            if (field.name in ("stage", "preset", *NOT_OPTIONS.get(prefix[:-1], ()))
                    or stage is not None and stage not in by_stage):
                continue
            value = getattr(config, field.name)
            kind = type(value[0]).__name__ + ",..." if isinstance(value, tuple) else \
                type(value).__name__
            shown = _shown({stage: getattr(c, field.name) for stage, c in by_stage.items()})
            help_text = f"{comments.get(field.name, '')} (default {shown})".lstrip()
            group.add_argument(f"--{prefix}{field.name}", metavar=kind.upper(),
                               help=help_text.replace("%", "%%"))
    return parser


def stage_defaults(stage, preset, smoke=False):
    """(TrainConfig, {part: config}) of `preset` for `stage`; with `smoke`, shrunk by SMOKE."""
    layers = [PRESETS[preset][stage]]
    if smoke:
        layers += [{"train": SMOKE_TRAIN}, SMOKE[stage]]
    train = TrainConfig(stage=stage, preset=preset, smoke=smoke)
    parts = {name: cls() for name, cls in PARTS[stage].configs.items()}
    for layer in layers:
        train = dataclasses.replace(train, **layer.get("train", {}))
        parts = {name: dataclasses.replace(c, **layer.get(name, {})) for name, c in parts.items()}
    return train, parts


def build_chain(argv):
    """Parses argv (`--key=value` or `--key value`) into [(TrainConfig, {part: config})], one
    per stage to run (every stage, in order, for `--stage all`): the stage's preset, shrunk by
    --smoke, then the options given, each parsed to its field's type. With --stage all an
    option of a part goes to the stage that builds it, and every other option to every stage;
    the stages whose networks --deca and --arcface replace are left out."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--stage", choices=(*STAGES, "all"))
    first.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    first.add_argument("--smoke", default="false")
    first.error = _refuse
    known, _ = first.parse_known_args(argv)
    smoke = _parse_value(known.smoke, False, "smoke")
    names = STAGES if known.stage in (None, "all") else (known.stage,)
    defaults = {stage: stage_defaults(stage, known.preset, smoke) for stage in names}
    every_part = {name: c for _, parts in defaults.values() for name, c in parts.items()}
    args, unknown = make_parser([t for t, _ in defaults.values()],
                                every_part).parse_known_args(argv)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key for the {known.stage} stage; "
                          f"`python train.py --stage {known.stage} --help` lists the known ones")
    given = {key: text for key, text in vars(args).items()
             if text is not None and key not in ("stage", "preset", "smoke")}
    chain = []
    for train, parts in defaults.values():
        configs = {"": train, **parts}
        changes = {name: {} for name in configs}  # all of a config's at once, so that the
        for key, text in given.items():  # checks between its fields see the final values
            part, _, field = key.rpartition(".")
            if part in configs:
                changes[part][field] = _parse_value(text, getattr(configs[part], field), key)
        configs = {name: dataclasses.replace(config, **changes[name])
                   for name, config in configs.items()}
        chain.append((configs.pop(""), configs))
    replaced = {stage for stage, option in PRETRAINED.items() if getattr(chain[-1][0], option)}
    return [(train, parts) for train, parts in chain if train.stage not in replaced]


def build_configs(argv):
    """(TrainConfig, {part: config}) of the one stage that argv names (see build_chain)."""
    chain = build_chain(argv)
    if len(chain) != 1:
        raise ConfigError("--stage all: expected one stage here")
    return chain[0]
