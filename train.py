"""Training for every stage: `python train.py --stage vqvae|slots|estimator|identity|ldm`.

DiffFAE (Wang et al. 2024) needs four pretrained parts before its diffusion model; the order is
    vqvae → slots (reads the VQ-VAE) → estimator, identity → ldm (reads all four).
This file is the loop they share; what each stage optimises and measures lives in stages.py.

One code path for one process and for torchrun (as nanoGPT): `ddp = "RANK" in os.environ`; gloo on
CPU, nccl on CUDA; only rank 0 writes; each rank seeds with seed + rank; `batch_size` is per
process. bf16 autocast on CUDA (autocast keeps norms and softmax in fp32). Gradient clipping, a
NaN/inf guard, atomic checkpoints carrying the config and RNG state, automatic resume. With
`ema_decay` > 0 an exponential moving average of the trained weights is kept, saved, restored on
resume and used for evaluation (the ldm stage samples with it, as LDM does).

Config: one dataclass per part (TrainConfig here, VQConfig, SlotsConfig, EstimatorConfig,
IdentityConfig in their modules); presets are plain dicts of overrides; `--key=value` sets a
TrainConfig field and `--part.key=value` a part's (e.g. `--vqvae.codebook_size=1024`); values are
parsed to the field's type and an unknown key is an error.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import stages
from data import write_atomic
from synthetic import DATA_VERSION, PARAM_KEYS


@dataclasses.dataclass
class TrainConfig:
    """Settings of the loop (the model parts have their own dataclasses)."""
    stage: str = "vqvae"
    preset: str = "tiny"
    data: str = "synthetic"       # "synthetic" or a folder in the vox-png layout
    out: str = "runs"             # checkpoints go to <out>/<stage>/ckpt.pt
    tag: str = ""                 # a variant's checkpoints go to <out>/<stage>-<tag>/ instead
    image_size: int = 64
    batch_size: int = 32          # per process
    steps: int = 3000
    lr: float = 2e-4
    warmup: int = 100             # linear learning-rate warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 500
    ckpt_every: int = 250
    seed: int = 0
    pool: int = 6000              # synthetic pairs rendered once and cached on disk
    identities: int = 2000        # synthetic identities the pool cycles through
    eval_items: int = 128         # held-out synthetic items used for the measurements
    num_workers: int = 0
    bf16: bool = True             # autocast to bfloat16 on CUDA
    ema_decay: float = 0.0        # EMA of the trained weights; 0 keeps none
    # stage options
    slots_target: str = "latent"  # slots: reconstruct the VQ latent ("latent") or "pixel"s
    slots_supervision: float = 0.0  # slots: weight of a mask loss on true regions (not in paper)
    photometric_weight: float = 1.0  # estimator: weight of the re-rendering loss
    slots_tag: str = ""           # ldm: start from runs/slots-<tag>/ instead of runs/slots/
    arcface_scale: float = 30.0   # identity: ArcFace s (the paper's 64 suits 85k classes)
    arcface_margin: float = 0.5   # identity: ArcFace m (Deng et al. 2019)


# Presets: per stage, overrides of TrainConfig ("train") and of the stage's part config.
PRESETS = {
    "tiny": {
        "vqvae": {"train": {"steps": 2500, "batch_size": 8, "lr": 4e-4},
                  "vqvae": {"base_channels": 16, "channel_mult": (1, 2, 4), "num_res_blocks": 1,
                            "norm_groups": 8, "codebook_size": 512, "restart_every": 25,
                            "disc_start": 10 ** 9}},
        # unsupervised slots reached mIoU 0.29 in this budget, region-supervised 0.89 (README):
        # the tiny preset supervises them (not in the paper; the paper preset does not)
        "slots": {"train": {"steps": 2500, "batch_size": 8, "lr": 4e-4, "slots_supervision": 1.0},
                  "slots": {"image_size": 64, "base_channels": 16, "channel_mult": (1, 2, 4),
                            "num_res_blocks": 1, "norm_groups": 8, "attn_heads": 4,
                            "feature_dim": 64, "slot_dim": 64, "mlp_hidden": 128,
                            "decoder_channels": 32, "decoder_layers": 3}},
        "estimator": {"train": {"steps": 2500, "batch_size": 8, "lr": 4e-4},
                      "estimator": {"image_size": 64, "base_channels": 32, "norm_groups": 8}},
        # ArcFace's s = 64, m = 0.5 suit 85k classes; with 2,000 synthetic identities seen a few
        # times each, m = 0.5 left the embeddings in a narrow cone (README, measured)
        "identity": {"train": {"steps": 2000, "batch_size": 16, "lr": 4e-4,
                               "arcface_scale": 16.0, "arcface_margin": 0.2},
                     "identity": {"image_size": 64, "base_channels": 16, "norm_groups": 8,
                                  "embedding_dim": 128}},
        "ldm": {"train": {"steps": 8000, "batch_size": 8, "lr": 4e-4, "ema_decay": 0.999,
                          "eval_every": 1000, "eval_items": 64},
                "unet": {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                         "attention_resolutions": (1, 2, 4), "head_channels": 32,
                         "norm_groups": 16},
                "diffusion": {"sample_steps": 20}},
    },
    "paper": {  # DiffFAE §5.1: Adam, lr 1e-4, batch 16 (per GPU here), 256 px; LDM's EMA
        stage: {"train": {"image_size": 256, "batch_size": 16, "lr": 1e-4, "steps": 100_000,
                          "pool": 0, "eval_every": 5000, "ckpt_every": 1000,
                          "ema_decay": 0.9999 if stage == "ldm" else 0.0}}
        for stage in ("vqvae", "slots", "estimator", "identity", "ldm")
    },
}


class ConfigError(ValueError):
    """A bad command-line value or key."""


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


def build_configs(argv):
    """Parses argv into (TrainConfig, {part: part config}) with preset and overrides applied."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=stages.STAGES, required=True)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"{item}: expected --key=value or --part.key=value")
        key, value = item[2:].split("=", 1)
        overrides[key] = value
    part_classes = stages.part_configs(args.stage)
    preset = PRESETS[args.preset][args.stage]
    train = dataclasses.replace(TrainConfig(stage=args.stage, preset=args.preset),
                                **preset.get("train", {}))
    parts = {name: cls(**preset.get(name, {})) for name, cls in part_classes.items()}
    for key, text in overrides.items():
        part, _, field = key.rpartition(".")
        target = train if not part else parts.get(part)
        if target is None or field not in {f.name for f in dataclasses.fields(target)}:
            known = [f.name for f in dataclasses.fields(TrainConfig)] + [
                f"{p}.{f.name}" for p, c in parts.items() for f in dataclasses.fields(c)]
            raise ConfigError(f"--{key}: unknown key; known keys: {', '.join(known)}")
        value = _parse_value(text, getattr(target, field), key)
        if not part:
            train = dataclasses.replace(train, **{field: value})
        else:
            parts[part] = dataclasses.replace(target, **{field: value})
    return train, parts


# ---------------------------------------------------------------------------------------------
# Data: a cached pool of synthetic pairs, or a folder of real frames
# ---------------------------------------------------------------------------------------------

class PairPool(Dataset):
    """Synthetic pairs rendered once and kept as uint8 (images, regions) and float32 params."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["source"])

    def __getitems__(self, indices):
        """Items shaped like SyntheticPortraits' (images in [-1, 1], regions long, params)."""
        items = []
        for i in indices:
            item = {"identity": int(self.tensors["identity"][i])}
            for image in ("source", "query"):
                item[image] = self.tensors[image][i].float() / 127.5 - 1
                item[f"{image}_regions"] = self.tensors[f"{image}_regions"][i].long()
                item[f"{image}_params"] = {key: self.tensors[f"{image}_{key}"][i]
                                           for key in PARAM_KEYS}
            items.append(item)
        return items

    @staticmethod
    def build(cfg, path, rank_zero):
        """Loads the pool at `path`, rendering it first (rank 0 only) if it is not there."""
        if rank_zero and not path.exists():
            from synthetic import SyntheticPortraits
            data = SyntheticPortraits(cfg.image_size, "train", cfg.seed, length=cfg.pool,
                                      identities=cfg.identities)
            chunks = []
            for start in tqdm(range(0, cfg.pool, 64), desc=f"rendering {path.name}"):
                chunks += data.__getitems__(range(start, min(cfg.pool, start + 64)))
            tensors = {}
            for key in ("source", "query"):
                tensors[key] = torch.stack([((c[key] + 1) * 127.5).round().to(torch.uint8)
                                            for c in chunks])
                tensors[f"{key}_regions"] = torch.stack([c[f"{key}_regions"].to(torch.uint8)
                                                         for c in chunks])
                for name in PARAM_KEYS:
                    tensors[f"{key}_{name}"] = torch.stack([c[f"{key}_params"][name]
                                                            for c in chunks])
            tensors["identity"] = torch.tensor([c["identity"] for c in chunks])
            atomic_save(tensors, path)
        if dist.is_initialized():
            dist.barrier()
        return PairPool(torch.load(path, weights_only=True))


class StepBatches(torch.utils.data.Sampler):
    """Index lists for steps start..steps-1; step s's batch depends only on (seed, rank, s), so a
    resumed run sees exactly the batches an uninterrupted one would have."""

    def __init__(self, n, batch_size, start, steps, seed):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.steps = start, steps

    def __iter__(self):
        for step in range(self.start, self.steps):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            yield torch.randint(self.n, (self.batch_size,), generator=generator).tolist()

    def __len__(self):
        return max(0, self.steps - self.start)


def make_dataset(cfg, rank_zero):
    if cfg.data == "synthetic":
        name = (f"synthetic-v{DATA_VERSION}-{cfg.image_size}px-{cfg.pool}pairs-"
                f"{cfg.identities}ids-seed{cfg.seed}.pt")
        return PairPool.build(cfg, Path(cfg.out) / "data" / name, rank_zero)
    from data import FrameFolder
    return FrameFolder(cfg.data, "train", cfg.image_size, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save that never leaves half a checkpoint (data.write_atomic)."""
    write_atomic(path, lambda file: torch.save(obj, file))


def rng_state():
    """Every generator's state as tensors and lists (loadable with weights_only=True)."""
    _, key, position, _, _ = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(key.astype(np.int64)),
            "numpy_position": position, "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    key = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy_position"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(cfg):
    folder = f"{cfg.stage}-{cfg.tag}" if cfg.tag else cfg.stage
    return Path(cfg.out) / folder / "ckpt.pt"


class EMA:
    """Exponential moving average of the trained parameters (Polyak averaging, as LDM's LitEma):
        θ_ema ← d·θ_ema + (1 − d)·θ,   d = min(decay, (1 + n)/(10 + n)) after n updates,
    the warm-up letting early averages forget the random initialisation."""

    def __init__(self, module, decay):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, module):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, parameter in module.named_parameters():
            if name in self.shadow:  # a loop over tensors, not elements
                self.shadow[name].lerp_(parameter.detach(), 1 - decay)

    def state_dict(self):
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, module):
        """Within the block the module carries the EMA weights; its own come back after."""
        parameters = dict(module.named_parameters())
        saved = {name: parameters[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                parameters[name].copy_(value)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    parameters[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def pick_device(local_rank):
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def train(cfg, parts):
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, local_rank = 0, 0
    master = rank == 0
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    path = checkpoint_path(cfg)
    resume = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if resume is not None:  # the model is rebuilt exactly as it was saved
        parts = {name: type(c)(**resume["config"][name]) for name, c in parts.items()}
    dataset = make_dataset(cfg, master)
    stage = stages.build(cfg, parts, device, n_identities=stages.count_identities(cfg, dataset))
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    start = 0
    if resume is not None:
        stage.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"][min(rank, len(resume["rng"]) - 1)])
        start = resume["step"]
        if master:
            print(f"resuming {cfg.stage} from {path} at step {start}")
    # made after loading: an average first asked for on resume starts from the loaded weights
    ema = EMA(stage, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and resume is not None and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    model = DistributedDataParallel(stage, device_ids=[local_rank] if device.type == "cuda"
                                    else None) if ddp else stage

    # its own generator: the loader draws a base seed when iterated, which would otherwise
    # shift the global stream (t and ε of the ldm stage) between a resumed run and a whole one
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), cfg.batch_size, start,
                                                           cfg.steps, cfg.seed + rank),
                        num_workers=cfg.num_workers, collate_fn=default_collate,
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    eval_set = stages.eval_set(cfg) if master else None
    log = None
    if master:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path.parent / "log.jsonl", "a")
    config = {"train": dataclasses.asdict(cfg),
              **{name: dataclasses.asdict(c) for name, c in parts.items()}}

    def save(step):
        if master:
            atomic_save({"stage": cfg.stage, "step": step, "model": stage.state_dict(),
                         "optimizer": optimizer.state_dict(), "rng": gather_rng(ddp),
                         "config": config, "ema": ema.state_dict() if ema else None}, path)
        elif ddp:
            gather_rng(ddp)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.bf16)
    progress = tqdm(total=cfg.steps, initial=start, disable=not master, desc=cfg.stage)
    started = time.time()
    step = start
    for step, batch in enumerate(loader, start):
        batch = stages.to_device(batch, device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        stage.train()
        with autocast:
            losses = model(batch, step)
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(stage.parameters(), cfg.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # before the weights change
            raise SystemExit(f"error: {cfg.stage} loss {loss.item()}, gradient norm "
                             f"{grad_norm.item()} at step {step}; the last good checkpoint is "
                             f"{path}: lower --lr or --grad_clip and rerun")
        optimizer.step()
        if ema is not None:
            ema.update(stage)
        stage.after_step(batch, step)
        done = step + 1
        if master and (done % cfg.log_every == 0 or done == cfg.steps):
            record = {"step": done, "time": round(time.time() - started, 1),
                      "grad_norm": float(grad_norm),
                      **{k: float(v.detach()) for k, v in losses.items()}}
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.set_postfix(loss=f"{loss.item():.4f}")
        progress.update(1)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save(done)
        if master and (done % cfg.eval_every == 0 or done == cfg.steps):
            stage.eval()
            with ema.applied(stage) if ema else contextlib.nullcontext():
                metrics = stage.evaluate(eval_set, path.parent / f"eval_{done:07d}.png")
            log.write(json.dumps({"step": done, "eval": metrics}) + "\n")
            log.flush()
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    progress.close()
    if master:
        log.close()
    if ddp:
        dist.destroy_process_group()
    return step


def gather_rng(ddp):
    """Every rank's RNG state, so a resumed DDP run continues each rank's stream."""
    state = rng_state()
    if not ddp:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def export(cfg, out):
    """Writes the inference weights (EMA, float16) of the stage's checkpoint to `out`."""
    from difffae import export_inference
    path = checkpoint_path(cfg)
    if cfg.stage != "ldm":
        raise ConfigError("--export: only the ldm stage makes a complete model")
    if not path.exists():
        raise stages.MissingCheckpoint(f"{path} is missing: nothing to export")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export_inference(checkpoint, out)
    print(f"wrote {out} (step {checkpoint['step']}, {Path(out).stat().st_size / 2**20:.1f} MiB)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    exporter = argparse.ArgumentParser(add_help=False)
    exporter.add_argument("--export", metavar="PATH",
                          help="write the checkpoint's inference weights to PATH and exit")
    args, argv = exporter.parse_known_args(argv)
    try:
        cfg, parts = build_configs(argv)
        if args.export:
            export(cfg, args.export)
        else:
            train(cfg, parts)
    except (ConfigError, stages.MissingCheckpoint, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
