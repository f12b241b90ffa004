"""Fault handling of train.py's loop, so that every rank of a run acts alike and no work is lost
without a word: one run per stage folder (a lock file), and stopping every rank at the same
step on a non-finite loss, a signal, the end of the time limit or a failed checkpoint write.
Each check that ranks must agree on is a collective under DDP (torch.distributed)."""
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


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
