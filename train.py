"""Training for every stage: `python train.py --stage vqvae|slots|estimator|identity|ldm`.

DiffFAE (Wang et al. 2024, §4.3, §5.1) needs four pretrained parts before its diffusion model:
    vqvae → slots (reads the VQ-VAE) → estimator, identity → ldm (reads all four).
This is the loop they share, after nanoGPT's train.py; stages.py says what each one optimises
and measures. Config: one dataclass per part (TrainConfig here); presets are dicts of overrides;
`--key=value` sets a TrainConfig field, `--part.key=value` a part's (`--vqvae.codebook_size=64`),
parsed to the field's type. Checkpoints carry the config and the RNG states; rerunning a stage
resumes from its checkpoint exactly (the batch of step s depends only on seed, rank and s).
One code path for one process and for torchrun (DDP: gloo on CPU, nccl on CUDA, only rank 0
writes, `batch_size` per process); bf16 autocast on CUDA, and on the CPU with `--bf16_cpu=true`.
Adam (DiffFAE §5.1) after a linear warm-up, gradient clipping, a NaN/inf guard; with `ema_decay`
> 0 an exponential moving average of the weights is kept, saved, restored and used for
evaluation (as LDM samples with it).
`--export PATH` writes an ldm checkpoint's inference weights (EMA, float16).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import stages
from data import write_atomic
from synthetic import DATA_VERSION, PARAM_KEYS, SyntheticPortraits


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
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 500
    ckpt_every: int = 250
    seed: int = 0
    pool: int = 6000              # synthetic pairs rendered once and cached; 0: each when drawn
    identities: int = 2000        # synthetic identities the pool cycles through
    eval_items: int = 128         # held-out synthetic items used for the measurements
    num_workers: int = 0
    bf16: bool = True             # autocast to bfloat16 on CUDA
    bf16_cpu: bool = False        # also on the CPU: the same code path, to test it without a GPU
    ema_decay: float = 0.0        # EMA of the trained weights; 0 keeps none
    # stage options
    slots_supervision: float = 0.0  # slots: weight of a mask loss on true regions (not in paper)
    photometric_weight: float = 1.0  # estimator: weight of the re-rendering loss
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
        for stage in stages.STAGES
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
    args, overrides = parser.parse_known_args(argv)
    preset = PRESETS[args.preset][args.stage]
    train = dataclasses.replace(TrainConfig(stage=args.stage, preset=args.preset),
                                **preset.get("train", {}))
    parts = {name: cls(**preset.get(name, {})) for name, cls in stages.PARTS[args.stage].items()}
    for item in overrides:
        key, equals, text = item[2:].partition("=")
        if not item.startswith("--") or not equals:
            raise ConfigError(f"{item}: expected --key=value or --part.key=value")
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


# -- Data: a cached pool of synthetic pairs, or a folder of real frames ----------------------------

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


def make_dataset(cfg, master):
    """Real frames of the folder cfg.data, or the pool of synthetic pairs: rendered by rank 0
    the first time and cached under <out>/data/."""
    if cfg.data != "synthetic":
        from data import FrameFolder
        return FrameFolder(cfg.data, "train", cfg.image_size, seed=cfg.seed)
    if cfg.pool == 0:  # no pool (the paper preset): render every pair when it is drawn
        return SyntheticPortraits(cfg.image_size, "train", cfg.seed, identities=cfg.identities)
    path = Path(cfg.out) / "data" / (f"synthetic-v{DATA_VERSION}-{cfg.image_size}px-{cfg.pool}"
                                     f"pairs-{cfg.identities}ids-seed{cfg.seed}.pt")
    if master and not path.exists():
        data = SyntheticPortraits(cfg.image_size, "train", cfg.seed, length=cfg.pool,
                                  identities=cfg.identities)
        chunks = []
        for start in tqdm(range(0, cfg.pool, 64), desc=f"rendering {path.name}"):
            pairs = default_collate(data.__getitems__(range(start, min(cfg.pool, start + 64))))
            chunk = {"identity": pairs["identity"]}
            for image in ("source", "query"):
                chunk[image] = ((pairs[image] + 1) * 127.5).round().to(torch.uint8)
                chunk[f"{image}_regions"] = pairs[f"{image}_regions"].to(torch.uint8)
                chunk.update({f"{image}_{key}": pairs[f"{image}_params"][key]
                              for key in PARAM_KEYS})
            chunks.append(chunk)
        atomic_save({key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}, path)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's pool
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


# -- Checkpoints: atomic, with every RNG state and the EMA -----------------------------------------

def atomic_save(obj, path):
    """torch.save that never leaves half a checkpoint (data.write_atomic)."""
    write_atomic(path, lambda file: torch.save(obj, file))


def checkpoint_path(cfg):
    return Path(cfg.out) / (f"{cfg.stage}-{cfg.tag}" if cfg.tag else cfg.stage) / "ckpt.pt"


def rng_states(ddp):
    """Every rank's torch generator states (CPU and CUDA; nothing here draws from numpy's or
    Python's global ones), so a resumed run continues each rank's streams. A collective under
    DDP: every rank calls it."""
    state = {"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not ddp:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def copy_into(tensors, values):
    for name, value in values.items():
        tensors[name].copy_(value)


class EMA:
    """Exponential moving average of the trained parameters (Polyak averaging, as LDM's LitEma):
        θ_ema ← d·θ_ema + (1 − d)·θ,   d = min(decay, (1 + n)/(10 + n)) after n updates,
    the warm-up letting early averages forget the random initialisation."""

    def __init__(self, module, decay):
        self.decay, self.updates = decay, 0
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
        copy_into(self.shadow, state["shadow"])

    @contextlib.contextmanager
    def applied(self, module):
        """Within the block the module carries the EMA weights; its own come back after."""
        parameters = dict(module.named_parameters())
        saved = {name: parameters[name].detach().clone() for name in self.shadow}
        copy_into(parameters, self.shadow)
        try:
            yield module
        finally:
            copy_into(parameters, saved)


# -- The loop --------------------------------------------------------------------------------------

def train(cfg, parts):
    # DDP: one process per device under torchrun, else a single process; one code path for both
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if ddp else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    master = rank == 0  # only rank 0 writes checkpoints, logs and pictures
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    torch.manual_seed(cfg.seed + rank)

    # the stage, its optimiser and EMA; from the checkpoint when there is one
    path = checkpoint_path(cfg)
    resume = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if resume is not None:  # the networks are rebuilt exactly as they were saved
        parts = {name: type(c)(**resume["config"][name]) for name, c in parts.items()}
    dataset = make_dataset(cfg, master)
    n_identities = cfg.identities if cfg.data == "synthetic" else len(dataset.identities)
    stage = stages.build(cfg, parts, device, n_identities)
    optimizer = torch.optim.Adam([p for p in stage.parameters() if p.requires_grad], lr=cfg.lr)
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
    # under DDP the gradients are averaged across ranks in backward()
    model = DistributedDataParallel(stage, device_ids=[local_rank] if device.type == "cuda"
                                    else None) if ddp else stage
    config = {"train": dataclasses.asdict(cfg),
              **{name: dataclasses.asdict(c) for name, c in parts.items()}}

    # its own generator: the loader draws a base seed when iterated, which would otherwise
    # shift the global stream (t and ε of the ldm stage) between a resumed run and a whole one
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), cfg.batch_size, start,
                                                           cfg.steps, cfg.seed + rank),
                        num_workers=cfg.num_workers, collate_fn=default_collate,
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    held_out = stages.to_device(stages.eval_set(cfg), device) if master else None
    if master:
        path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path.parent / "log.jsonl", "a") if master else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.bf16 and (device.type == "cuda"
                                                    or device.type == "cpu" and cfg.bf16_cpu))
    progress = tqdm(total=cfg.steps, initial=start, disable=not master, desc=cfg.stage)
    started = time.time()
    for step, batch in enumerate(loader, start):
        batch = stages.to_device(batch, device)
        for group in optimizer.param_groups:  # linear warm-up
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        # forward / backward
        stage.train()
        with autocast:
            losses = model(batch, step)
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # clip; a non-finite loss or gradient stops the run before the weights change
        grad_norm = torch.nn.utils.clip_grad_norm_(stage.parameters(), cfg.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise SystemExit(f"error: {cfg.stage} loss {loss.item()}, gradient norm "
                             f"{grad_norm.item()} at step {step}; the last good checkpoint is "
                             f"{path}: lower --lr or --grad_clip and rerun")
        # step, EMA, then the stage's work outside the gradient (the VQ-VAE's code restarts)
        optimizer.step()
        if ema is not None:
            ema.update(stage)
        stage.after_step(batch, step)
        done = step + 1
        # log
        if master and (done % cfg.log_every == 0 or done == cfg.steps):
            print(json.dumps({"step": done, "time": round(time.time() - started, 1),
                              "grad_norm": float(grad_norm),
                              **{k: float(v.detach()) for k, v in losses.items()}}),
                  file=log, flush=True)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        progress.update(1)
        # checkpoint: every rank hands in its RNG states, rank 0 writes
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            rng = rng_states(ddp)
            if master:
                atomic_save({"stage": cfg.stage, "step": done, "model": stage.state_dict(),
                             "optimizer": optimizer.state_dict(), "rng": rng, "config": config,
                             "ema": ema.state_dict() if ema else None}, path)
        # evaluate on held-out identities, with the EMA weights swapped in
        if master and (done % cfg.eval_every == 0 or done == cfg.steps):
            stage.eval()
            with ema.applied(stage) if ema else contextlib.nullcontext():
                result = stage.evaluate(held_out, path.parent / f"eval_{done:07d}.png")
            print(json.dumps({"step": done, "eval": result}), file=log, flush=True)
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    progress.close()
    if master:
        log.close()
    if ddp:
        dist.destroy_process_group()


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
    exporter = argparse.ArgumentParser(add_help=False)
    exporter.add_argument("--export", metavar="PATH",
                          help="write the checkpoint's inference weights to PATH and exit")
    args, argv = exporter.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, parts = build_configs(argv)
        if args.export:
            export(cfg, args.export)
        else:
            train(cfg, parts)
    except ValueError as error:  # ConfigError, MissingCheckpoint and the configs' own checks
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
