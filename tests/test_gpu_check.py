"""bench.py's GPU check, run as its CPU dry run (tiny sizes, bf16 autocast on the CPU, a gloo DDP
run), so that its first run on a GPU does not die on a bug in its own code; its command-line
errors; and, marked slow (`python -m pytest -m slow`), the paper preset's step on the CPU."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([0-9]+\.[0-9]+)"


def table(text):
    """The rows of the Markdown table in `text` after its header and rule, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[1] == "|" + "---|" * (lines[0].count("|") - 1), lines[:2]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_gpu_check_dry_run_measures_every_row(tmp_path, capsys):
    bench.gpu_check(torch.device("cpu"), tmp_path)
    rows = {name: (value, setting) for name, value, setting in table(capsys.readouterr().out)}
    check = bench.CHECK["cpu"]
    speed = re.fullmatch(NUMBER + " steps/s", rows["ldm training speed, bf16"][0])
    assert speed and float(speed[1]) > 0
    ddp = rows[f"DDP, 2 processes (gloo), ldm, {check['ddp_steps']} steps"][0]
    assert re.fullmatch(NUMBER + " steps/s", ddp) and float(ddp.split()[0]) > 0
    ddp_checkpoint = torch.load(tmp_path / "ldm-ddp" / "ckpt.pt", weights_only=True)
    assert ddp_checkpoint["step"] == check["ddp_steps"] and len(ddp_checkpoint["rng"]) == 2
    for stage in ("vqvae", "slots", "estimator", "identity", "ldm", "edit"):
        assert rows[f"peak GPU memory, {stage}" + (" stage" if stage != "edit" else "")]
    for sampler, steps in check["edits"]:
        for precision in ("bf16", "float32"):
            seconds = re.fullmatch(NUMBER + " s", rows[f"edit, {sampler} {steps} steps, "
                                                      f"{precision}"][0])
            assert seconds and float(seconds[1]) >= 0
    assert len(rows) == 2 + 5 + 4 + 1


def test_command_line_errors_are_one_line():
    for args, message in ((["--gpu-check", "--paper-step"], "not allowed with"),
                          (["--device", "cuda"] if not torch.cuda.is_available()
                           else ["--device", "tpu"], "--device")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_the_paper_preset_steps_on_the_cpu(tmp_path):
    """Minutes and about 15 GiB: every stage at 256 px, the 421M-parameter UNet included."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--paper-step",
                           f"--out={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    runs, networks = done.stdout.split("\n\n")
    assert [row[0] for row in table(runs)] == [
        stage for stage in ("vqvae", "slots", "estimator", "identity", "ldm") for _ in (1, 2)] \
        + ["edit (sample.py)"]
    assert {name: count for name, count in table(networks)}["UNet ε_θ"] == "421.0M"
    assert (tmp_path / "edit.png").stat().st_size > 0
    assert torch.load(tmp_path / "ldm" / "ckpt.pt", mmap=True, weights_only=True)["step"] == 2


def test_the_flop_count_of_the_rehearsal_matches_the_closed_form():
    """A matrix product (B, I) @ (I, O) is 2·B·I·O FLOPs; a 3×3 convolution of C_in to C_out
    channels on an H × W output is 2·C_in·9·C_out·H·W per image; backward doubles each."""
    linear, conv = torch.nn.Linear(7, 5, bias=False), torch.nn.Conv2d(3, 4, 3, padding=1)
    x, image = torch.randn(6, 7), torch.randn(2, 3, 8, 8)
    with bench.FlopCount() as count:
        linear(x)
    assert count.total == 2 * 6 * 7 * 5
    with bench.FlopCount() as count:
        conv(image.requires_grad_()).sum().backward()  # forward, grads of input and weight
    assert count.total == 3 * (2 * 3 * 9 * 4 * 8 * 8 * 2)
