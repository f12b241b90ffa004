"""bench.py's GPU check, run as its CPU dry run (tiny sizes, bf16 autocast on the CPU, a gloo DDP
run), so that its first run on a GPU does not die on a bug in its own code; its command-line
errors; and, marked slow (`python -m pytest -m slow`), the paper preset's step on the CPU."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tools import bench
from training.config import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([0-9]+\.[0-9]+)"


def table(text):
    """The rows of the Markdown table in `text` after its header and rule, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[1] == "|" + "---|" * (lines[0].count("|") - 1), lines[:2]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_gpu_check_dry_run_measures_every_row(tmp_path, capsys):
    """The table names the expected rows, and its figures agree with each other and with the
    logs they come from: a speed is (last step − step `warm`) / (time between them) in train.py's
    log.jsonl, with the step counts taken from CHECK; that interval lies within its run's
    reported seconds; and the whole check took at least the sum of its reported parts, where a
    median of REPEATS runs means ⌊REPEATS/2⌋ + 1 of them took at least that long."""
    started = time.perf_counter()
    bench.gpu_check(torch.device("cpu"), tmp_path)
    elapsed = time.perf_counter() - started
    rows = table(capsys.readouterr().out)
    check, warm = bench.CHECK["cpu"], bench.CHECK["cpu"]["warm"]
    speed = "ldm training speed, bf16"
    ddp = f"DDP, 2 processes (gloo), ldm, {check['ddp_steps']} steps"
    stages = {stage: f"peak GPU memory, {stage} stage" for stage in STAGES}
    edits = [f"edit, {sampler} {steps} steps, {precision}"
             for sampler, steps in check["edits"] for precision in ("bf16", "float32")]
    assert [row[0] for row in rows] == [speed, ddp, *stages.values(), *edits,
                                        "peak GPU memory, edit"]
    value, setting = ({row[0]: row[i] for row in rows} for i in (1, 2))
    # the stages' and the DDP run's wall times, printed in whole seconds (so each ±0.5 s)
    seconds = {name: int(re.search(r", ([0-9]+) s( in all)?$", setting[name])[1])
               for name in (ddp, *stages.values())}
    for name, folder, last, run in ((speed, "ldm", check["ldm_steps"], stages["ldm"]),
                                    (ddp, "ldm-ddp", check["ddp_steps"], ddp)):
        lines = map(json.loads, open(tmp_path / folder / "log.jsonl"))
        logged = {line["step"]: line["time"] for line in lines if "time" in line}  # to 0.1 s
        interval = logged[last] - logged[warm]
        steps_per_s = float(re.fullmatch(NUMBER + " steps/s", value[name])[1])
        assert abs(steps_per_s - (last - warm) / interval) <= 0.005 + 1e-9, (name, interval)
        assert interval <= seconds[run] + 0.5 + 0.1, (name, interval, seconds[run])
    assert setting[speed].startswith(f"steps {warm}–{check['ldm_steps']}, batch ")
    for stage, name in stages.items():
        steps = check["ldm_steps"] if stage == "ldm" else check["steps"]
        assert setting[name].startswith(f"{steps} steps of train.py")
    assert {value[name] for name in stages.values()} | {value["peak GPU memory, edit"]} \
        == {"— (CPU)"}
    medians = [float(re.fullmatch(NUMBER + " s", value[name])[1]) for name in edits]
    assert all(setting[name].endswith(f"median of {bench.REPEATS}") for name in edits)
    least = sum(seconds.values()) + (bench.REPEATS // 2 + 1) * sum(medians)
    slack = 0.5 * len(seconds) + 0.005 * (bench.REPEATS // 2 + 1) * len(medians)  # rounding
    assert least <= elapsed + slack, (least, elapsed)
    ddp_checkpoint = torch.load(tmp_path / "ldm-ddp" / "ckpt.pt", weights_only=True)
    assert ddp_checkpoint["step"] == check["ddp_steps"] and len(ddp_checkpoint["rng"]) == 2


def test_command_line_errors_are_one_line():
    for args, message in ((["--gpu-check", "--paper-step"], "not allowed with"),
                          (["--device", "cuda"] if not torch.cuda.is_available()
                           else ["--device", "tpu"], "--device")):
        done = subprocess.run([sys.executable, "-m", "tools.bench", *args],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_the_paper_preset_steps_on_the_cpu(tmp_path):
    """Minutes and about 15 GiB: every stage at 256 px, the 421M-parameter UNet included."""
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--paper-step",
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
