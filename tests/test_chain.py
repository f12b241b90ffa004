"""train.py across runs: --stage all under --smoke, one run per stage folder, damaged checkpoints
and pools, resumes that change options, and the time limit. Real processes throughout."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import torch

import train
from test_train import ROOT, SMALL, run
from training.config import build_chain

VQ = ["--stage", "vqvae", "--ckpt_every=1"]


def test_the_smoke_chain_trains_every_stage_exports_and_the_export_edits(tmp_path):
    out, model = tmp_path / "runs", tmp_path / "model.pt"
    command = [sys.executable, "train.py", "--stage", "all", "--smoke=true", f"--out={out}",
               f"--export={model}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    # two threads: the estimator and the identity encoder train beside the VQ-VAE and the slots
    beside = (out / "estimator+identity.log").read_text()
    for number, stage in enumerate(("vqvae", "slots", "estimator", "identity", "ldm"), 1):
        said = beside if stage in ("estimator", "identity") else done.stdout
        assert f"{stage}: stage {number} of 5" in said
        assert torch.load(out / stage / "ckpt.pt", weights_only=True)["step"] >= 3
    # on its one thread the second process trains what a run of that stage alone trains
    alone = subprocess.run([sys.executable, "train.py", "--stage", "estimator", "--smoke=true",
                            f"--out={tmp_path / 'alone'}"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr[-2000:]
    weights = [torch.load(folder / "estimator" / "ckpt.pt", weights_only=True)["model"]
               for folder in (out, tmp_path / "alone")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and again.stdout.count("skipped") == 5, again.stdout
    edit = subprocess.run([sys.executable, "sample.py", "examples/src.png", "examples/qry.png",
                           "--ckpt", str(model), "--out", str(tmp_path / "edit.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert edit.returncode == 0 and (tmp_path / "edit.png").stat().st_size > 0, edit.stderr


def stages_of(lanes):
    return [[cfg.stage for cfg, _ in lane] for lane in lanes]


def test_split_lanes_runs_beside_what_reads_no_unfinished_stage(tmp_path):
    chain = build_chain(["--stage", "all", "--smoke=true", f"--out={tmp_path}"])
    assert stages_of(train.split_lanes(chain)) == [
        ["vqvae", "slots"], ["estimator", "identity"], ["ldm"]]
    assert stages_of(train.split_lanes(chain[1:])) == [
        ["slots"], ["estimator", "identity"], ["ldm"]]
    assert stages_of(train.split_lanes(chain[2:])) == [
        ["estimator"], ["identity"], ["ldm"]]
    assert stages_of(train.split_lanes(chain[4:])) == [["ldm"], [], []]
    # on frames the estimator finds the face with the slots: only the identity encoder is free
    frames = [(dataclasses.replace(cfg, data=str(tmp_path)), parts) for cfg, parts in chain]
    assert stages_of(train.split_lanes(frames)) == [
        ["vqvae", "slots", "estimator"], ["identity"], ["ldm"]]


def test_a_failure_beside_stops_the_chain_with_one_line_after_this_lane(tmp_path):
    (tmp_path / "identity").mkdir(parents=True)  # held by a live process: this one
    (tmp_path / "identity" / "lock").write_text(
        f'{{"pid": {os.getpid()}, "host": "{os.uname().nodename}", "since": 0}}')
    done = subprocess.run([sys.executable, "train.py", "--stage", "all", "--smoke=true",
                           f"--out={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})
    log = tmp_path / "estimator+identity.log"
    assert done.returncode == 2 and "is in use by process" in log.read_text()
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the stages beside (estimator, identity) stopped with status 2; their output "
        f"is in {log}")
    for stage in ("vqvae", "slots", "estimator"):  # both lanes went as far as they could
        assert (tmp_path / stage / "ckpt.pt").exists()
    assert not (tmp_path / "ldm").exists()


def test_a_second_run_into_a_locked_folder_is_refused_and_the_first_finishes(tmp_path):
    first = subprocess.Popen([sys.executable, "train.py", *VQ, "--steps=40", *SMALL,
                              f"--out={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "vqvae" / "lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.05)
    second = run([*VQ, "--steps=40"], tmp_path)
    assert second.returncode == 2
    line = second.stderr.strip()
    assert line.startswith(f"error: {tmp_path / 'vqvae'} is in use by process {first.pid} on ")
    assert f"kill {first.pid}" in line and "\n" not in line
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    assert torch.load(tmp_path / "vqvae" / "ckpt.pt", weights_only=True)["step"] == 40
    assert not lock.exists()  # released at the end


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae" / "lock").write_text(
        f'{{"pid": {gone.pid}, "host": "{os.uname().nodename}", "since": 0}}')
    done = run([*VQ, "--steps=1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"taking over the lock of a run that is gone (process {gone.pid})" in done.stderr


def test_the_lock_is_released_when_a_signal_stops_the_run(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", *VQ, "--steps=10000", *SMALL,
                                f"--out={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "vqvae" / "ckpt.pt").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert not (tmp_path / "vqvae" / "lock").exists()


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run([*VQ, "--steps=4"], whole).returncode == 0
    assert run([*VQ, "--steps=3"], split).returncode == 0
    newest = split / "vqvae" / "ckpt.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # a copy cut short
    resumed = run([*VQ, "--steps=4"], split)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"{newest}: not a readable checkpoint" in resumed.stderr
            and "ckpt.prev.pt (step 2) instead" in resumed.stderr)
    assert f"resuming from {newest.with_name('ckpt.prev.pt')} at step 2" in resumed.stdout
    a, b = (torch.load(out / "vqvae" / "ckpt.pt", weights_only=True) for out in (whole, split))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    (split / "vqvae" / "ckpt.prev.pt").write_bytes(b"not a checkpoint")
    newest.write_bytes(b"")
    neither = run([*VQ, "--steps=5"], split)
    assert neither.returncode == 2 and neither.stderr.startswith("error: neither ")
    assert neither.stderr.count("\n") == 1, neither.stderr


def test_a_damaged_pool_is_rendered_again_and_the_run_goes_on(tmp_path):
    assert run([*VQ, "--steps=1"], tmp_path).returncode == 0
    (pool,) = (tmp_path / "data").iterdir()
    intact = pool.read_bytes()
    pool.write_bytes(intact[:len(intact) // 2])
    done = run([*VQ, "--steps=2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{pool}: unreadable (" in done.stderr and "rendering it again" in done.stderr
    assert pool.read_bytes() == intact  # the same pairs as before


def test_a_resume_that_changes_a_network_is_refused_and_one_that_changes_lr_is_said(tmp_path):
    assert run([*VQ, "--steps=1"], tmp_path).returncode == 0
    changed = run([*VQ, "--steps=2", "--vqvae.codebook_size=512"], tmp_path)
    assert changed.returncode == 2
    assert changed.stderr.startswith(f"error: --vqvae.codebook_size=512: {tmp_path}/vqvae/ckpt.pt"
                                     f" was trained with 1024; ")
    faster = run([*VQ, "--steps=2", "--lr=1e-3"], tmp_path)
    assert faster.returncode == 0
    assert "resuming with --lr=0.001 (the checkpoint's run had 0.0004)" in faster.stdout
    nothing = run([*VQ, "--steps=2"], tmp_path)
    assert nothing.returncode == 0
    assert "is at step 2, --steps=2: nothing to do (raise --steps to train on)" in nothing.stdout


def test_the_time_limit_ends_the_run_with_a_checkpoint_and_a_rerun_goes_on(tmp_path):
    done = run([*VQ, "--steps=100000", "--time_limit=0.001"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "vqvae" / "ckpt.pt", weights_only=True)["step"] == 1
    assert run([*VQ, "--steps=100000", "--time_limit=0.001"], tmp_path).returncode == 0
    assert torch.load(tmp_path / "vqvae" / "ckpt.pt", weights_only=True)["step"] == 2
