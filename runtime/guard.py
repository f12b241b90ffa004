"""The run's safety, off train.py's reading path, so that every rank of a run acts alike and no
work is lost without a word: one run per stage folder (a lock file); every rank stopped at the
same step on a non-finite loss, a signal, the end of the time limit or a failed checkpoint
write; files written whole or not at all (write_atomic), the previous checkpoint kept beside
the newest and read when the newest cannot be; and every RNG state saved, so that a resumed
run goes on exactly. Each check that ranks must agree on is a collective under DDP."""
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.checkpoint import read_checkpoint


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


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's, alive
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder, ddp, device, master):
    """Within the block this run alone trains into `folder`: rank 0 holds the file `lock`
    there (process id, host, start time) and removes it on every exit. A lock held by a live
    process refuses the run in one line; one whose process is gone is taken over."""
    lock, held, refusal = Path(folder) / "lock", False, None
    if master:
        lock.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        while not held and refusal is None:
            try:
                with open(lock, "x") as file:
                    json.dump(owner, file)
                held = True
            except FileExistsError:
                refusal = take_over_or_refuse(lock)
    if agree([refusal is not None], ddp, device)[0]:
        raise Stopped(f"error: {refusal}" if refusal else "", 2)
    try:
        yield
    finally:
        if held:
            lock.unlink(missing_ok=True)


def take_over_or_refuse(lock):
    """None once the stale `lock` of a gone process is removed; else why the run is refused."""
    try:
        owner = json.loads(lock.read_text())
        pid, host, since = int(owner["pid"]), owner["host"], float(owner["since"])
    except (OSError, ValueError, KeyError, TypeError):  # half written by a process killed then
        owner = None
    if owner is None or host == socket.gethostname() and not process_alive(pid):
        print(f"{lock}: taking over the lock of a run that is gone "
              f"({'unreadable' if owner is None else f'process {pid}'})", file=sys.stderr)
        lock.unlink(missing_ok=True)
        return None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    stop = f"kill {pid}" if host == socket.gethostname() else f"stop it on {host}"
    return (f"{lock.parent} is in use by process {pid} on {host} since {started}: wait for it "
            f"to end, or stop it (`{stop}`) and rerun; if it is gone, delete {lock}")


class Guard:
    """The fault handling of the loop, so that every rank stops at the same step with the last
    checkpoint whole: a non-finite loss or gradient stops before the weights change; SIGTERM,
    SIGINT (Ctrl-C) and the end of `time_limit` end the step with a checkpoint; a failed
    checkpoint write stops every rank. Each check is a collective under DDP. A second signal
    acts as it would without the guard (Ctrl-C twice interrupts at once)."""

    def __init__(self, cfg, path, ddp, device, start):
        self.cfg, self.path, self.ddp, self.device = cfg, path, ddp, device
        self.kept = f"{path} holds step {start}" if start else "no checkpoint was written"
        self.received, self.previous = [], {}
        self.deadline = time.time() + cfg.time_limit if cfg.time_limit else float("inf")
        self.signalled = self.timed_out = False

    def __enter__(self):
        def note(signum, frame):
            self.received.append(signum)
            signal.signal(signum, self.previous[signum])
        self.previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def check(self, loss, grad_norm, step):
        """Raises Stopped if any rank saw a non-finite loss or gradient; notes whether any saw a
        signal, or rank 0's time limit ran out, for the step to end with a checkpoint."""
        bad, signalled, late = agree([not (torch.isfinite(loss) and torch.isfinite(grad_norm)),
                                      bool(self.received), time.time() > self.deadline],
                                     self.ddp, self.device)
        if bad:
            seen = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
            if self.ddp:
                seen = f"on {bad:.0f} of {dist.get_world_size()} processes; rank 0: {seen}"
            raise Stopped(f"error: {self.cfg.stage}: non-finite loss or gradient norm at step "
                          f"{step + 1} ({seen}); the weights were not updated and {self.kept}: "
                          f"lower --lr or --grad_clip and rerun", 1)
        self.signalled, self.timed_out = bool(signalled), bool(late)

    def saved(self, failed, done):
        """After rank 0's checkpoint write: `failed` its OSError or None."""
        if agree([failed is not None], self.ddp, self.device)[0]:
            raise Stopped(f"error: writing the checkpoint of step {done} failed ({failed}); "
                          f"{self.kept}, unharmed", 1)
        self.kept = f"{self.path} holds step {done}"

    def stop_if_signalled(self, done):
        if self.signalled:
            signum = (self.received or [signal.SIGTERM])[0]
            raise Stopped(f"stopped by {signal.Signals(signum).name} at step {done}; {self.path} "
                          f"holds it: rerun the same command to resume", 128 + signum)


def write_atomic(path, write) -> None:
    """Call write(file) on a new temporary file beside path, then rename it over path: readers,
    and a crash or a full disk halfway, never leave half a file; the old one stays until then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def atomic_save(obj, path):
    """torch.save that never leaves half a file (write_atomic)."""
    write_atomic(path, lambda file: torch.save(obj, file))


def save_checkpoint(state, path):
    """Writes `state` whole beside `path`, then makes the checkpoint there the previous one
    (ckpt.prev.pt, a second link to the same file) and the new one the newest: `path` always
    holds a whole checkpoint, and a crash at any point leaves both readable."""
    fresh, kept = path.with_name("ckpt.new.pt"), path.with_name("ckpt.kept.pt")
    atomic_save(state, fresh)
    if path.exists():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(kept)  # left by a crash between the two lines below
        try:
            os.link(path, kept)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, kept)
        os.replace(kept, previous_checkpoint(path))
    os.replace(fresh, path)


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


def truncate_log(path, step):
    """Keeps the lines of a log up to `step`, where a run resumes: a killed run's later lines,
    or one cut short, are written again and would otherwise be there twice."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    write_atomic(path, lambda file: file.write("".join(kept).encode()))


def previous_checkpoint(path):
    """The checkpoint kept beside `path` (ckpt.pt), one save older."""
    return Path(path).with_name("ckpt.prev.pt")


def read_stage_checkpoint(path):
    """The newest readable of a stage's ckpt.pt and the previous one kept beside it, saying in
    one line when the newest cannot be read; None if there is neither. The state's "file" is
    the path it was read from."""
    previous = previous_checkpoint(path)
    if not Path(path).exists() and not previous.exists():
        return None
    try:
        return {**read_checkpoint(path), "file": str(path)}
    except ValueError as error:
        problem = error
    try:
        state = read_checkpoint(previous)
    except ValueError:
        raise ValueError(f"neither {path} nor {previous} can be read: restore a copy, or move "
                         f"them away to train the stage again") from None
    print(f"{problem}; using {previous} (step {state['step']}) instead", file=sys.stderr)
    return {**state, "file": str(previous)}
