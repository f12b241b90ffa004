"""Faults a training run meets, on real train.py processes: SIGINT / SIGTERM (checkpoint the
current step, exit non-zero, resume exactly), a non-finite loss (every rank stops at the same
step, one message), a failed checkpoint write (the previous checkpoint stays whole), the EMA
under DDP, and bad values refused in one line before any work."""
import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from training.config import (build_configs, NOT_OPTIONS, PRESETS, stage_defaults, STAGE_ONLY,
                             STAGES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny, with evaluations and dead-code restarts (a short usage memory leaves codes dead) often
SMALL = ["--stage", "vqvae", "--image_size=32", "--batch_size=2", "--pool=8", "--identities=4",
         "--eval_items=2", "--log_every=1", "--warmup=1", "--eval_every=4",
         "--vqvae.restart_every=2", "--vqvae.usage_decay=0.5"]
FAR = "--steps=100000"  # a target an interrupted run never reaches


def command(out, *args):
    return [sys.executable, os.path.join(ROOT, "train.py"), *SMALL, f"--out={out}", *args]


def logged(out):
    """{step: loss} of the log's training lines, and the list of their steps in order."""
    lines = [json.loads(line) for line in open(out / "vqvae" / "log.jsonl")]
    steps = [line["step"] for line in lines if "loss" in line]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}, steps


def interrupt(out, signum, after):
    """Starts a long run, sends `signum` once the log passes step `after`; returns the step the
    run says it checkpointed, after checking its exit status and message."""
    process = subprocess.Popen(command(out, FAR), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    log, deadline = out / "vqvae" / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and
                                          log.read_text().count('"loss": ') > after):
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    name = signal.Signals(signum).name
    stopped = re.search(rf"stopped by {name} at step (\d+); (\S+) holds it", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-2000:]
    step = int(stopped[1])
    assert step > after and torch.load(stopped[2], weights_only=True)["step"] == step
    return step


def test_a_signal_checkpoints_the_current_step_and_the_rerun_resumes_exactly(tmp_path):
    """Ctrl-C, then a scheduler's SIGTERM, then a rerun to the end: the same weights, buffers
    and losses as a run never stopped, each step logged once, across evaluations and restarts."""
    split, whole = tmp_path / "split", tmp_path / "whole"
    first = interrupt(split, signal.SIGINT, after=3)
    second = interrupt(split, signal.SIGTERM, after=first + 3)
    end = f"--steps={second + 3}"
    for out in (split, whole):
        done = subprocess.run(command(out, end), cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(whole / "vqvae" / "ckpt.pt", weights_only=True)
    b = torch.load(split / "vqvae" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == second + 3
    for key in a["model"]:  # weights and the codebook's usage
        assert torch.equal(a["model"][key], b["model"][key]), key
    (losses, steps), (whole_losses, _) = logged(split), logged(whole)
    assert steps == list(range(1, second + 4))  # once each, in order
    assert losses == whole_losses


def test_a_non_finite_loss_stops_a_single_process_run_in_one_line(tmp_path):
    """A learning rate of 1e30 makes the weights overflow within two steps."""
    done = subprocess.run(command(tmp_path, "--steps=10", "--lr=1e30"), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.match(r"error: vqvae: non-finite loss or gradient norm at step \d+ \(loss nan",
                    errors[0]), errors


# A 2-process run in which rank 1 alone sees a NaN loss at step 3. Added as a constant, the NaN
# leaves every gradient finite: only the loss tells, and only on rank 1. Each rank also saves
# its EMA as first made, and its exit status.
POISONED = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
from training import stages
out, rank = {out!r}, int(os.environ["RANK"])
forward = stages.VQStage.forward

def poisoned(self, batch, step):
    losses = forward(self, batch, step)
    if rank == 1 and step == 2:
        losses["loss"] = losses["loss"] + float("nan")
    return losses

made = train.EMA.__init__

def recorded(self, module, decay):
    made(self, module, decay)
    torch.save(self.shadow, f"{{out}}/ema_rank{{rank}}.pt")

stages.VQStage.forward, train.EMA.__init__ = poisoned, recorded
try:
    train.main(sys.argv[1:])
except SystemExit as stop:
    open(f"{{out}}/exit_rank{{rank}}", "w").write(str(stop.code))
    raise
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_and_emas_start_equal(tmp_path):
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED.format(root=ROOT, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *SMALL, "--steps=6",
                           "--ema_decay=0.9", f"--out={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert done.returncode != 0
    # both ranks stopped themselves (none waited in a collective until killed), one message
    assert [(tmp_path / f"exit_rank{r}").read_text() for r in (0, 1)] == ["1", "1"], \
        done.stderr[-3000:]
    message = re.findall(r"error: vqvae: non-finite loss or gradient norm at step (\d+) "
                         r"\(on 1 of 2 processes", done.stderr)
    assert message == ["3"], done.stderr[-3000:]
    # the EMA was made from the weights DDP broadcast from rank 0, not from each rank's own
    a, b = (torch.load(tmp_path / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    args = [*SMALL, f"--out={tmp_path}", "--ckpt_every=1"]
    train.main([*args, "--steps=2"])
    checkpoint = tmp_path / "vqvae" / "ckpt.pt"
    before = checkpoint.read_bytes()

    def full_disk(obj, file):  # a few bytes land, then the disk is full
        file.write(before[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main([*args, "--steps=4"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"error: writing the checkpoint of step 3 failed ([Errno {errno.ENOSPC}] "
                     f"{os.strerror(errno.ENOSPC)}); {checkpoint} holds step 2, unharmed")
    assert checkpoint.read_bytes() == before
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    names = sorted(p.name for p in checkpoint.parent.iterdir() if ".pt" in p.name)
    assert names == ["ckpt.prev.pt", "ckpt.pt"]  # no temporary file left


@pytest.mark.parametrize("value", ["--steps=0", "--steps=-5", "--batch_size=0", "--lr=nan",
                                   "--eval_every=0", "--ema_decay=1.5", "--smoke=yes"])
def test_bad_values_are_refused_in_one_line_before_any_work(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage", "vqvae", value, f"--out={tmp_path}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {value}: expected ") and error.count("\n") == 1, error
    assert not list(tmp_path.iterdir())  # no pool, no log, no folder


def test_help_lists_every_option_with_its_type_and_default(capsys):
    cfg, parts = build_configs(["--stage", "vqvae", "--steps", "7", "--vqvae.beta", "0.5"])
    assert cfg.steps == 7 and parts["vqvae"].beta == 0.5  # `--key value` as `--key=value`
    # without --stage: each part with its stage's preset values (no preset uses the
    # dataclasses' own), and an option whose value differs between stages shows each
    everything = [(f"{name}.", part) for stage in STAGES
                  for name, part in stage_defaults(stage, "tiny")[1].items()]
    cfg, parts = build_configs(["--stage", "ldm"])  # the tiny preset's values
    ldm = [("", cfg)] + [(f"{name}.", config) for name, config in parts.items()]
    for argv, configs in (([], everything), (["--stage", "ldm"], ldm)):
        with pytest.raises(SystemExit) as stop:
            train.main([*argv, "--help"])
        assert stop.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for prefix, config in configs:
            for field in dataclasses.fields(config):
                value = getattr(config, field.name)
                only = STAGE_ONLY.get(field.name) if not prefix else None
                if field.name in ("stage", "preset"):
                    continue
                if field.name in NOT_OPTIONS.get(prefix[:-1], ()):
                    assert f"--{prefix}{field.name} " not in text  # filled in by the stage
                    continue
                if only is not None and argv and only not in argv:
                    assert f"--{field.name} " not in text  # another stage's option
                    continue
                many = isinstance(value, tuple)
                kind = type(value[0] if many else value).__name__.upper() + (",..." if many else "")
                option = f"--{prefix}{field.name} {kind}"
                assert option in text, option
                shown = re.search(r"\(default (.*?)\)", text.split(option, 1)[1])[1]
                assert shown == (",".join(map(str, value)) if many else repr(value)), option
        if not argv:
            steps = ", ".join(f"{stage} {PRESETS['tiny'][stage]['train']['steps']}"
                              for stage in STAGES)
            assert f"(default per stage: {steps})" in text
    assert cfg.steps == PRESETS["tiny"]["ldm"]["train"]["steps"]
    assert "--steps INT the run ends" in text and "--vqvae." not in text
    # a comment of several lines is the whole help of its option
    assert "ends (0: no limit); a rerun goes on from there (default 0.0)" in text
    listed = re.findall(r" (--[a-z_.]+) (?:[A-Z]+|\{)", text)  # each option with its type
    assert len(set(listed)) <= 45, listed  # the ldm stage's, the usage line's --stage once


@pytest.mark.parametrize("export, problem", [("{tmp}", "a directory; expected a file name"),
                                             ("/proc/model.pt", "cannot write in the folder"),
                                             ("{tmp}/model.bin", "expected a .pt file name")])
def test_a_bad_export_is_refused_before_any_training(export, problem, tmp_path, capsys):
    export = export.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--stage", "all", f"--export={export}", f"--out={tmp_path / 'runs'}"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --export {export}: {problem}") and error.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # no pool, no stage began
