"""Training: `python train.py --stage vqvae|slots|estimator|identity|ldm`, or `--stage all`.

DiffFAE (Wang et al. 2024, §4.3, §5.1) needs four pretrained parts before its diffusion model:
    vqvae → slots (reads the VQ-VAE) → estimator, identity → ldm (reads all four).
`--stage all` runs them, skipping the finished ones, then writes `--export`; on a CPU the estimator
and identity stages run in a second process beside vqvae → slots (run_chain).
This is the loop they share, after nanoGPT's train.py. training/stages.py says what each stage
optimises and measures (the ldm stage's step is DiffFAE.loss), training/config.py holds the
presets and the options (`python train.py --stage ldm --help`), training/datasets.py what the
stages draw, and runtime/guard.py the run's safety (folder lock, signals, agreement across
ranks, atomic checkpoints with the previous one kept).

A checkpoint carries the config and every RNG state, and what step s draws depends only on
(seed, rank, s), so a rerun resumes exactly; the previous checkpoint is kept beside the newest.
One code path for one process and for torchrun (DDP: gloo on the CPU, nccl on CUDA; rank 0
writes; `batch_size` is the total over the processes); bf16 autocast on CUDA (and on the CPU with
`--bf16_cpu=true`). Adam (DiffFAE §5.1) after a linear warm-up, gradient clipping, and with
`ema_decay` > 0 an exponential moving average of the weights (training/ema.py), used for
evaluation and export.
"""
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from runtime.cli import check_output
from runtime.guard import (Guard, Stopped, folder_lock, read_stage_checkpoint, rng_states,
                           save_checkpoint, set_rng_state, truncate_log)
from training import stages
from training.config import ConfigError, PRETRAINED, STAGES, build_chain
from training.datasets import make_dataset, to_device
from training.ema import EMA


# -- Batches: step s's depends only on (seed, rank, s) ---------------------------------------------

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


def make_loader(cfg, dataset, start, rank, processes):
    # its own generator: the loader draws a base seed when iterated, which would otherwise
    # shift the global stream (t and ε of the ldm stage) between a resumed run and a whole one
    batches = StepBatches(len(dataset), cfg.batch_size // processes, start, cfg.steps,
                          cfg.seed + rank)
    workers = cfg.workers if cfg.data != "synthetic" else 0  # a pool is indexed, not read
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                      collate_fn=default_collate,
                      generator=torch.Generator().manual_seed(cfg.seed + rank))


# -- Checkpoints (runtime.guard writes them) and resume --------------------------------------------

def checkpoint_path(cfg):
    return Path(cfg.out) / (f"{cfg.stage}-{cfg.tag}" if cfg.tag else cfg.stage) / "ckpt.pt"


def check_resume(config, saved, path, master):
    """A resume must rebuild the networks it saved: a changed network option is refused, naming
    it and both values; a changed training option (lr, steps, ...) is said in one line."""
    for part, fields in config.items():
        for field, value in fields.items():
            before = saved.get(part, {}).get(field, value)
            if before == value or isinstance(before, list) and tuple(before) == value:
                continue
            option = f"--{field}" if part == "train" else f"--{part}.{field}"
            if part != "train" or field in PRETRAINED.values() and bool(before) != bool(value):
                raise ConfigError(f"{option}={value}: {path} was trained with {before}; rerun "
                                  f"with that value, or start another run with --tag or --out")
            if master and field not in ("out", "export", "workers", "time_limit"):
                print(f"resuming with {option}={value} (the checkpoint's run had {before})")


def build_or_resume(cfg, parts, device, rank, path, n_identities):
    """The stage, its optimiser and EMA: new, or as the newest readable checkpoint left them.
    Returns (stage, optimizer, ema, first step, config to save, the file resumed from)."""
    resume = read_stage_checkpoint(path)
    stage = stages.build(cfg, parts, device, n_identities)  # completes `parts` in place
    config = {"train": dataclasses.asdict(cfg),
              **{name: dataclasses.asdict(c) for name, c in parts.items()}}
    optimizer = torch.optim.Adam([p for p in stage.parameters() if p.requires_grad], lr=cfg.lr)
    if resume is None:
        return stage, optimizer, None, 0, config, None
    check_resume(config, resume["config"], path, rank == 0)
    stage.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    set_rng_state(resume["rng"][min(rank, len(resume["rng"]) - 1)])
    return stage, optimizer, resume.get("ema"), resume["step"], config, resume["file"]


# -- The loop --------------------------------------------------------------------------------------

def setup_device(cfg):
    """(ddp, rank, device): one process per device under torchrun, else a single process."""
    ddp = "RANK" in os.environ
    processes = int(os.environ["WORLD_SIZE"]) if ddp else 1
    if cfg.batch_size % processes:  # batch_size is the total, as the paper's batch of 16
        raise ConfigError(f"--batch_size={cfg.batch_size}: not divisible by the {processes} "
                          f"processes")
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if ddp else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return ddp, rank, device


def train(cfg, parts, between_steps=None):
    """Trains one stage up to cfg.steps (or for cfg.time_limit seconds) from its checkpoint,
    calling between_steps(), if given, after each step. Returns the last step done."""
    ddp, rank, device = setup_device(cfg)
    master, path = rank == 0, checkpoint_path(cfg)  # only rank 0 writes
    stages.require_earlier_checkpoints(cfg)  # before the pool: a missing one fails at once
    torch.manual_seed(cfg.seed + rank)
    with folder_lock(path.parent, ddp, device, master):
        dataset = make_dataset(cfg, master)
        n_identities = cfg.identities if cfg.data == "synthetic" else len(dataset.identities)
        stage, optimizer, ema_state, start, config, resumed = build_or_resume(
            cfg, parts, device, rank, path, n_identities)
        if start >= cfg.steps:
            if master:
                print(f"{cfg.stage}: {path} is at step {start}, --steps={cfg.steps}: nothing to "
                      f"do (raise --steps to train on)")
            return start
        if master:
            print(f"{cfg.stage}: resuming from {resumed} at step {start}" if start else
                  f"{cfg.stage}: training from scratch into {path}")
        stage.prepare(dataset, master)
        # under DDP the gradients are averaged across ranks in backward()
        model = DistributedDataParallel(stage, device_ids=[device.index]
                                        if device.type == "cuda" else None) if ddp else stage
        # the EMA is made after DDP's broadcast of rank 0's weights, so that every rank averages
        # the same, and after loading: one first asked for on resume starts from the loaded ones
        ema = EMA(stage, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if ema is not None and ema_state:
            ema.load_state_dict(ema_state)
        loader = make_loader(cfg, dataset, start, rank, dist.get_world_size() if ddp else 1)
        run = {"stage": stage, "model": model, "optimizer": optimizer, "ema": ema,
               "config": config, "path": path, "ddp": ddp, "device": device,
               "between_steps": between_steps}
        return loop(cfg, run, loader, start, master)


def loop(cfg, run, loader, start, master):
    """The training loop, after nanoGPT's: forward and backward, a check that every rank can go
    on, the step, then logging, checkpointing and evaluation at their intervals."""
    stage, optimizer, ema, path, device = (run[k] for k in ("stage", "optimizer", "ema", "path",
                                                              "device"))
    held_out = to_device(stages.eval_set(cfg), device) if master else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.bf16 and (device.type == "cuda"
                                                    or device.type == "cpu" and cfg.bf16_cpu))
    if master:
        truncate_log(path.parent / "log.jsonl", start)
    done, started = start, time.time()
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(path.parent / "log.jsonl", "a")) if master else None
        progress = stack.enter_context(tqdm(total=cfg.steps, initial=start, disable=not master,
                                            desc=cfg.stage, dynamic_ncols=True))
        guard = stack.enter_context(Guard(cfg, path, run["ddp"], device, start))
        for step, batch in enumerate(loader, start):
            batch = to_device(batch, device)
            for group in optimizer.param_groups:  # linear warm-up of the learning rate
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            # forward, backward, clip; then every rank learns whether any must stop
            stage.train()
            with autocast:
                losses = run["model"](batch, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(stage.parameters(), cfg.grad_clip)
            guard.check(losses["loss"], grad_norm, step)
            # step, EMA, then the stage's work outside the gradient (the VQ-VAE's code restarts)
            optimizer.step()
            if ema is not None:
                ema.update(stage)
            stage.after_step(batch, step)
            done, last = step + 1, step + 1 == cfg.steps or guard.timed_out
            progress.update(1)
            if run["between_steps"]:
                run["between_steps"]()
            # log
            if master and (done % cfg.log_every == 0 or last):
                memory = {"cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                          } if device.type == "cuda" else {}
                print(json.dumps({"step": done, "time": round(time.time() - started, 1),
                                  "grad_norm": float(grad_norm), **memory,
                                  **{k: float(v.detach()) for k, v in losses.items()}}),
                      file=log, flush=True)
                progress.set_postfix(loss=f"{losses['loss'].item():.4f}")
            # checkpoint: every rank hands in its RNG states, rank 0 writes
            if done % cfg.ckpt_every == 0 or last or guard.signalled:
                checkpoint(cfg, run, guard, done, master)
            guard.stop_if_signalled(done)
            # evaluate held-out identities with the EMA weights, on RNG streams of its own
            if last:
                progress.close()  # before the last evaluation's line, so the bar ends once
            if master and (done % cfg.eval_every == 0 or last):
                evaluate(run, held_out, path.parent / f"eval_{done:07d}.png", done, log)
            if last:
                break
    return done


def checkpoint(cfg, run, guard, done, master):
    """Saves step `done` (rank 0); a failed write stops every rank, the last checkpoint whole."""
    rng, failed = rng_states(run["ddp"]), None
    if master:
        try:
            save_checkpoint({"stage": cfg.stage, "step": done, "rng": rng,
                             "model": run["stage"].state_dict(), "config": run["config"],
                             "optimizer": run["optimizer"].state_dict(),
                             "ema": run["ema"].state_dict() if run["ema"] else None},
                            run["path"])
        except OSError as error:  # a full disk
            failed = error
    guard.saved(failed, done)


def evaluate(run, held_out, png, done, log):
    """Measures held-out items (stages.Stage.evaluate) and logs the result."""
    stage, ema, device = run["stage"], run["ema"], run["device"]
    stage.eval()
    with torch.random.fork_rng([device] if device.type == "cuda" else []), \
            ema.applied(stage) if ema else contextlib.nullcontext():
        result = stage.evaluate(held_out, png)
    print(json.dumps({"step": done, "eval": result}), file=log, flush=True)
    tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


# -- The programs: one stage, the whole chain, the export ------------------------------------------

def export(cfg, out):
    """Writes the inference weights (EMA, float16) of the ldm checkpoint to `out`."""
    from runtime.checkpoint import export_inference
    if cfg.stage != "ldm":
        raise ConfigError("--export: only the ldm stage makes a complete model")
    checkpoint = read_stage_checkpoint(checkpoint_path(cfg))
    if checkpoint is None:
        raise stages.MissingCheckpoint(f"{checkpoint_path(cfg)} is missing: nothing to export")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export_inference(checkpoint, out)
    print(f"wrote {out} (step {checkpoint['step']}, {Path(out).stat().st_size / 2 ** 20:.1f} MiB)")


def first_process():
    """Whether this is rank 0 (or the only process): the one that speaks and writes."""
    return int(os.environ.get("RANK", 0)) == 0


def finished(cfg, done, chain):
    """Says where a stage's run left its checkpoint, its last picture and what comes next."""
    if not first_process():
        return
    path = checkpoint_path(cfg)
    pictures = sorted(path.parent.glob("eval_*.png"))
    line = f"{cfg.stage}: step {done} of {cfg.steps} in {path}"
    if pictures:
        line += f"; held-out picture {pictures[-1]}"
    if not chain:
        following = STAGES[STAGES.index(cfg.stage) + 1:]
        line += (f"; next: python train.py --stage {following[0]} --out={cfg.out}" if following
                 else f"; next: python train.py --stage ldm --out={cfg.out} --export=model.pt")
    print(line)


def run_stage(cfg, parts, between_steps=None):
    """Trains one stage of the chain, saying which it is and where it ended."""
    limit = f", at most {cfg.time_limit:g} s this run" if cfg.time_limit else ""
    if first_process():
        print(f"{cfg.stage}: stage {STAGES.index(cfg.stage) + 1} of {len(STAGES)}, to step "
              f"{cfg.steps}{limit}", flush=True)
    finished(cfg, train(cfg, parts, between_steps), chain=True)


def split_lanes(pending):
    """(here, beside, after): the chain's unfinished stages as this process runs them, first
    `here`, meanwhile `beside` in a second process, then `after` once both are done. The first
    unfinished stage runs here; a later one goes beside when it reads no unfinished stage (on
    synthetic data the estimator and the identity encoder read neither the VQ-VAE nor the
    slots)."""
    waiting = {cfg.stage for cfg, _ in pending}
    beside = [(cfg, parts) for cfg, parts in pending[1:]
              if not waiting.intersection(stages.requirements(cfg))]
    names = {cfg.stage for cfg, _ in beside}
    here, after = [], []
    for cfg, parts in pending:
        if cfg.stage not in names:
            lane = after if after or names.intersection(stages.requirements(cfg)) else here
            lane.append((cfg, parts))
    return here, beside, after


def run_beside(lane, log, threads):
    """The second lane of the chain, in a process of its own: its stages in order on `threads`
    threads, all it prints appended to `log`."""
    with open(log, "a") as file:
        os.dup2(file.fileno(), sys.stdout.fileno())
        os.dup2(file.fileno(), sys.stderr.fileno())
    torch.set_num_threads(threads)
    with exit_on_error():
        for cfg, parts in lane:
            run_stage(cfg, parts)


def run_side_by_side(here, beside, threads):
    """Runs `beside` in a second process while this one runs `here`, each on half the threads,
    this one taking them all when the other is done. Ctrl-C stops both, each with a checkpoint,
    and so does an error here; an error there is reported once the stages here are done."""
    out = Path(beside[0][0].out)
    make_dataset(beside[0][0], True)  # the pool, rendered once before two processes read it
    log = out / f"{'+'.join(cfg.stage for cfg, _ in beside)}.log"
    print(f"{', '.join(cfg.stage for cfg, _ in beside)}: in a second process beside "
          f"{', '.join(cfg.stage for cfg, _ in here)}, {threads // 2} thread(s) each; its "
          f"output is appended to {log}", flush=True)
    other = multiprocessing.get_context("spawn").Process(
        target=run_beside, args=(beside, log, threads // 2), name="beside")
    other.start()
    torch.set_num_threads(threads - threads // 2)

    def widen():  # once the other lane is done, this one takes every thread
        if other.exitcode is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    try:
        for cfg, parts in here:
            run_stage(cfg, parts, between_steps=widen)
    except BaseException:
        other.terminate()  # SIGTERM: it checkpoints and stops
        raise
    finally:
        other.join()
        torch.set_num_threads(threads)
    if other.exitcode:  # negative: killed by that signal, which a shell reports as 128 + it
        status = other.exitcode if other.exitcode > 0 else 128 - other.exitcode
        raise Stopped(f"error: the stages beside ({', '.join(c.stage for c, _ in beside)}) "
                      f"stopped with status {status}; their output is in {log}", status)


def run_chain(chain):
    """Each stage of `chain` not yet finished, then the export of --export. On a CPU with two
    threads or more, in one process, the stages that do not depend on each other run side by
    side (split_lanes), each lane on half the threads, and this one on all of them as soon as
    the other lane is done; on a GPU, under torchrun, or with OMP_NUM_THREADS=1, one after
    another. A stage draws the same batches in either lane; only the rounding of its sums can
    change with the number of threads."""
    pending = []
    for cfg, parts in chain:
        state = read_stage_checkpoint(checkpoint_path(cfg))
        if state is not None and state["step"] >= cfg.steps:
            if first_process():
                print(f"{cfg.stage}: finished ({checkpoint_path(cfg)} at step {state['step']} "
                      f"of {cfg.steps}), skipped")
        else:
            pending.append((cfg, parts))
    threads = torch.get_num_threads()
    alone = "RANK" in os.environ or torch.cuda.is_available() or torch.backends.mps.is_available()
    here, beside, after = split_lanes(pending) if threads > 1 and not alone else (pending, [], [])
    if beside:
        run_side_by_side(here, beside, threads)
    else:
        after = here + after
    for cfg, parts in after:
        run_stage(cfg, parts)
    cfg = chain[-1][0]
    if cfg.export and first_process():
        export(cfg, cfg.export)


@contextlib.contextmanager
def exit_on_error():
    """Ends the process with one line and a non-zero status on the errors a user acts on."""
    try:
        yield
    except ValueError as error:  # ConfigError, MissingCheckpoint and the configs' own checks
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        if first_process() and str(stop):
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


def main(argv=None):
    with exit_on_error():
        chain = build_chain(sys.argv[1:] if argv is None else argv)
        if chain[-1][0].export:  # before hours of training, not after them
            check_output(chain[-1][0].export, "--export", ".pt")
        cfg, parts = chain[0]
        if len(chain) > 1:
            run_chain(chain)
        elif cfg.export:
            export(cfg, cfg.export)
        else:
            finished(cfg, train(cfg, parts), chain=False)


if __name__ == "__main__":
    main()
