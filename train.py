"""Training for every stage: `python train.py --stage vqvae|slots|estimator|identity|ldm`.

DiffFAE (Wang et al. 2024, §4.3, §5.1) needs four pretrained parts before its diffusion model:
    vqvae → slots (reads the VQ-VAE) → estimator, identity → ldm (reads all four).
This is the loop they share, after nanoGPT's train.py; stages.py says what each one optimises
and measures, config.py the options (`python train.py --help`). Checkpoints carry the config
and the RNG states; rerunning a stage resumes from its checkpoint exactly (what step s draws
depends only on seed, rank and s, and evaluating draws nothing from training's streams).
SIGTERM or Ctrl-C checkpoints the current step and exits; a non-finite loss or a failed
checkpoint write stops every rank at the same step, the last checkpoint intact.
One code path for one process and for torchrun (DDP: gloo on CPU, nccl on CUDA, only rank 0
writes, `batch_size` the total over the processes); bf16 autocast on CUDA, and on the CPU with
`--bf16_cpu=true`.
Adam (DiffFAE §5.1) after a linear warm-up, gradient clipping, a NaN/inf guard; with `ema_decay`
> 0 an exponential moving average of the weights is kept, saved, restored and used for
evaluation (as LDM samples with it).
`--export PATH` writes an ldm checkpoint's inference weights (EMA, float16).
"""
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

import stages
from config import ConfigError, build_configs
from data import write_atomic
from synthetic import DATA_VERSION, PARAM_KEYS, SyntheticPortraits


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
    """Real frames of the folder cfg.data, or synthetic pairs: a pool rendered by rank 0 the
    first time and cached under <out>/data/ (about 200 MB for 6,000 pairs at 64 px)."""
    if cfg.data != "synthetic":
        from data import FrameFolder
        return FrameFolder(cfg.data, "train", cfg.image_size, seed=cfg.seed)
    if cfg.pool == 0:  # each batch rendered as it is drawn (a 256 px pool would fill the memory)
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
            generator = stages.step_generator(self.seed, step)
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


# -- Stopping: every rank at the same step, on a signal or a fault; the log cut back on resume -----

class Stopped(Exception):
    """Training stops early on every rank: rank 0 prints the message; the exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def agree(flags, ddp, device):
    """Each flag summed over the ranks, so that every rank acts on what any one saw. A
    collective under DDP: every rank calls it."""
    flags = torch.tensor([float(f) for f in flags], device=device)  # nccl reduces CUDA tensors
    if ddp:
        dist.all_reduce(flags)
    return flags.tolist()


@contextlib.contextmanager
def signals_caught(signums):
    """Within the block a signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) is only noted
    in the yielded list, for the loop to checkpoint and stop at the end of the step; a second
    one acts as before (Ctrl-C twice interrupts at once)."""
    received, previous = [], {}

    def note(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    previous.update({signum: signal.signal(signum, note) for signum in signums})
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def truncate_log(path, step):
    """Keeps the lines of a log up to `step`, where a run resumes: a killed run's later lines,
    or one cut short, are written again and would otherwise be there twice."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    write_atomic(path, lambda file: file.write("".join(kept).encode()))


# -- The loop --------------------------------------------------------------------------------------

def train(cfg, parts):
    # DDP: one process per device under torchrun, else a single process; one code path for both
    ddp = "RANK" in os.environ
    processes = int(os.environ["WORLD_SIZE"]) if ddp else 1
    if cfg.batch_size % processes:  # batch_size is the total, as the paper's batch of 16
        raise ConfigError(f"--batch_size={cfg.batch_size}: not divisible by the {processes} "
                          f"processes")
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
    # under DDP the gradients are averaged across ranks in backward()
    model = DistributedDataParallel(stage, device_ids=[local_rank] if device.type == "cuda"
                                    else None) if ddp else stage
    # made after DDP's broadcast of rank 0's weights, so that every rank averages the same, and
    # after loading: an average first asked for on resume starts from the loaded weights
    ema = EMA(stage, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and resume is not None and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    config = {"train": dataclasses.asdict(cfg),
              **{name: dataclasses.asdict(c) for name, c in parts.items()}}

    # its own generator: the loader draws a base seed when iterated, which would otherwise
    # shift the global stream (t and ε of the ldm stage) between a resumed run and a whole one
    batches = StepBatches(len(dataset), cfg.batch_size // processes, start, cfg.steps,
                          cfg.seed + rank)
    loader = DataLoader(dataset, batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=default_collate,
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    held_out = stages.to_device(stages.eval_set(cfg), device) if master else None
    if master:
        truncate_log(path.parent / "log.jsonl", start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.bf16 and (device.type == "cuda"
                                                    or device.type == "cpu" and cfg.bf16_cpu))
    kept = f"{path} holds step {start}" if resume is not None else "no checkpoint was written"
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(path.parent / "log.jsonl", "a")) if master else None
        progress = stack.enter_context(tqdm(total=cfg.steps, initial=start, disable=not master,
                                            desc=cfg.stage))
        received = stack.enter_context(signals_caught((signal.SIGTERM, signal.SIGINT)))
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
            grad_norm = torch.nn.utils.clip_grad_norm_(stage.parameters(), cfg.grad_clip)
            # every rank learns whether any saw a non-finite loss or gradient, or a signal, so
            # that all stop at the same step (one alone would leave the others waiting)
            bad, signalled = agree([not (torch.isfinite(loss) and torch.isfinite(grad_norm)),
                                    bool(received)], ddp, device)
            if bad:  # before the weights change
                seen = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
                if ddp:
                    seen = f"on {bad:.0f} of {dist.get_world_size()} processes; rank 0: {seen}"
                raise Stopped(f"error: {cfg.stage}: non-finite loss or gradient norm at step "
                              f"{step + 1} ({seen}); the weights were not updated and {kept}: "
                              f"lower --lr or --grad_clip and rerun", 1)
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
            # checkpoint: every rank hands in its RNG states, rank 0 writes; a failed write
            # (a full disk) leaves the previous checkpoint whole and stops every rank
            if done % cfg.ckpt_every == 0 or done == cfg.steps or signalled:
                rng, failed = rng_states(ddp), None
                if master:
                    try:
                        atomic_save({"stage": cfg.stage, "step": done, "rng": rng,
                                     "model": stage.state_dict(), "config": config,
                                     "optimizer": optimizer.state_dict(),
                                     "ema": ema.state_dict() if ema else None}, path)
                    except OSError as error:
                        failed = error
                if agree([failed is not None], ddp, device)[0]:
                    raise Stopped(f"error: writing the checkpoint of step {done} failed "
                                  f"({failed}); {kept}, unharmed", 1)
                kept = f"{path} holds step {done}"
            if signalled:
                name = signal.Signals(received[0]).name if received else "a signal"
                raise Stopped(f"stopped by {name} at step {done}; {path} holds it: rerun the "
                              f"same command to resume", 128 + (received or [signal.SIGTERM])[0])
            # evaluate on held-out identities, with the EMA weights swapped in; its own RNG
            # streams, so that evaluating never changes what training draws next
            if master and (done % cfg.eval_every == 0 or done == cfg.steps):
                stage.eval()
                with torch.random.fork_rng([device] if device.type == "cuda" else []), \
                        ema.applied(stage) if ema else contextlib.nullcontext():
                    result = stage.evaluate(held_out, path.parent / f"eval_{done:07d}.png")
                print(json.dumps({"step": done, "eval": result}), file=log, flush=True)
                tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}"
                                                        for k, v in result.items()))


def export(cfg, out):
    """Writes the inference weights (EMA, float16) of the stage's checkpoint to `out`."""
    from checkpoint import export_inference
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
    try:
        cfg, parts = build_configs(sys.argv[1:] if argv is None else argv)
        if cfg.export:
            export(cfg, cfg.export)
        else:
            train(cfg, parts)
    except ValueError as error:  # ConfigError, MissingCheckpoint and the configs' own checks
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        if int(os.environ.get("RANK", 0)) == 0:
            print(stop, file=sys.stderr)
        sys.exit(stop.status)
    except OSError as error:  # a full disk, an unreadable data folder
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the loop, or Ctrl-C twice
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
