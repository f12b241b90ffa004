"""train.py across runs: --stage all under --smoke, one run per stage folder, damaged checkpoints
and pools, resumes that change options, and the time limit. Real processes throughout."""
import os
import signal
import subprocess
import sys
import time

import torch

from test_train import ROOT, SMALL, run

VQ = ["--stage", "vqvae", "--ckpt_every=1"]


def test_the_smoke_chain_trains_every_stage_exports_and_the_export_edits(tmp_path):
    out, model = tmp_path / "runs", tmp_path / "model.pt"
    command = [sys.executable, "train.py", "--stage", "all", "--smoke=true", f"--out={out}",
               f"--export={model}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    for number, stage in enumerate(("vqvae", "slots", "estimator", "identity", "ldm"), 1):
        assert f"{stage}: stage {number} of 5" in done.stdout
        assert torch.load(out / stage / "ckpt.pt", weights_only=True)["step"] >= 3
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and again.stdout.count("skipped") == 5, again.stdout
    edit = subprocess.run([sys.executable, "sample.py", "examples/src.png", "examples/qry.png",
                           "--ckpt", str(model), "--out", str(tmp_path / "edit.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert edit.returncode == 0 and (tmp_path / "edit.png").stat().st_size > 0, edit.stderr


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
