"""The --explain figure: its numbers read set_numbers' conventions back, the trace is the edit's
own sampling run (replaying the sampler from it gives the same tensors, bit for bit) and leaves
the output unchanged, its maps sum to one over the tokens, the panels show those maps where the
layout puts them with and without swaps, and the training stages' grids carry the mask rows.

Edits use the bundled 64 px model with a few sampling steps; the stage grids use the random 32 px
parts of test_difffae."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from tools import explain
from training import pictures
from training import stages
from training.config import build_configs
from runtime.images import load_image, to_pil
from runtime.checkpoint import load_model
from difffae import set_numbers
from samplers import ddim_step, make_timesteps, predict_x0
from layers import REGION_NAMES
from sample import DEFAULT_CHECKPOINT
from assets.synthetic import SyntheticPortraits
from test_difffae import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
SAMPLER = "ddim"  # whatever the model's default: the replay below takes DDIM steps


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def images(model):
    return {name: load_image(os.path.join(ROOT, "examples", f"{name}.png"), model.image_size)[None]
            for name in ("src", "qry", "other")}


@pytest.fixture(scope="module")
def edits(model, images):
    """Traced edits of the examples: (arguments, trace, result) plain, with the hair of
    other.png, and by numbers alone."""
    cases = {"plain": {"query": images["qry"]},
             "hair": {"query": images["qry"], "swap": {"hair": images["other"]}},
             "numbers": {"numbers": {"yaw": 20.0, "light": [1.0, 0.0, 1.0]}}}
    out = {}
    for name, arguments in cases.items():
        trace = {}
        result = model.edit(images["src"], steps=STEPS, sampler=SAMPLER, trace=trace,
                            **arguments)
        out[name] = (arguments, trace, result)
    return out


def test_numbers_of_reads_back_the_conventions_of_set_numbers():
    torch.manual_seed(0)
    coefficients = {"pose": torch.randn(2, 6) * 0.3, "light": torch.randn(2, 9, 3),
                    "expression": torch.zeros(2, 23)}
    # a pure turn about the vertical axis is yaw alone; the jaw is its x rotation
    coefficients["pose"][0, :4] = torch.tensor([0.0, math.radians(30), 0.0, math.radians(8)])
    read = explain.numbers_of(coefficients)
    assert read["yaw"][0].item() == pytest.approx(30, abs=1e-4)
    assert read["pitch"][0].item() == pytest.approx(0, abs=1e-4)
    assert read["jaw"][0].item() == pytest.approx(8, abs=1e-4)
    wanted = {"yaw": -25.0, "pitch": 10.0, "roll": 5.0, "jaw": 12.0, "light": [1.0, 0.0, 1.0]}
    read = explain.numbers_of(set_numbers(coefficients, wanted))
    for name in ("yaw", "pitch", "roll", "jaw"):
        assert read[name].tolist() == pytest.approx([wanted[name]] * 2, abs=1e-4), name
    assert torch.allclose(read["light"], torch.tensor([0.5 ** 0.5, 0, 0.5 ** 0.5]), atol=1e-6)
    strength = coefficients["light"][:, 1:4].norm(dim=1).mean(dim=1)  # kept by set_numbers
    assert read["strength"].tolist() == pytest.approx(strength.tolist(), rel=1e-6)


def test_the_trace_is_the_edit_itself_and_changes_nothing(model, images, edits):
    arguments, trace, result = edits["hair"]
    again = model.edit(images["src"], steps=STEPS, sampler=SAMPLER, **arguments)
    assert torch.equal(again["image"], result["image"])
    steps = trace["steps"]
    timesteps = make_timesteps(STEPS, model.diffusion.timesteps)
    assert [step["t"] for step in steps] == timesteps
    alpha_bar = [float(model.alphas_cumprod[t]) for t in timesteps] + [1.0]
    for i, step in enumerate(steps[:-1]):  # DDIM from the trace: the next z_t
        assert torch.equal(ddim_step(step["x"], step["eps"], alpha_bar[i], alpha_bar[i + 1]),
                           steps[i + 1]["x"])
    again = model.denoise(steps[2]["x"], steps[2]["t"], trace["cond"])
    assert torch.equal(again[0], steps[2]["eps"])
    assert all(torch.equal(a, b) for a, b in zip(again[1], steps[2]["attn"]))
    seen = explain.explanation(model, trace, images["qry"])
    last = len(steps) - 1
    assert explain.trajectory_steps(STEPS) == [0, 1, 2, 3, 4, 5] == sorted(seen["x0"])
    assert torch.equal(seen["x0"][last], result["image"])  # the last step lands on x̂_0
    x0 = predict_x0(steps[0]["x"], steps[0]["eps"], alpha_bar[0])
    assert torch.equal(seen["x0"][0], model.decode_latent(x0))


def test_maps_sum_to_one_over_the_tokens_at_every_pixel(model, images, edits):
    _, trace, _ = edits["plain"]
    seen = explain.explanation(model, trace, images["qry"])
    assert sorted(seen["attention"]) == [0, STEPS // 2, STEPS - 1]  # first, middle, last
    maps = [seen["masks"], seen["query_masks"], *seen["attention"].values()]
    for found in maps:
        assert found.shape == (1, len(REGION_NAMES), 16, 16)  # the slot masks' size (Eq. 7)
        assert found.min() >= 0 and torch.allclose(found.sum(1), torch.ones(1, 16, 16),
                                                   atol=1e-5)
    attention = seen["attention"][0]
    assert not torch.allclose(attention, seen["query_masks"], atol=0.05)  # not a copy of M_Q
    # the panels are these maps enlarged: a nearest-neighbour block per map pixel, still
    # summing to one; the argmax map takes each pixel's winning slot colour
    large = pictures.enlarge(seen["masks"], 64)
    assert torch.equal(large[..., ::4, ::4], seen["masks"]) and torch.allclose(
        large.sum(1), torch.ones(1, 64, 64), atol=1e-5)
    rows = pictures.mask_rows(images["src"], seen["masks"])
    assert len(rows) == len(REGION_NAMES) + 1
    winner = large.argmax(1)[0]  # (64, 64)
    faded = images["src"][0] + pictures.TINT * (pictures.paint(
        torch.nn.functional.one_hot(winner, 4).permute(2, 0, 1)[None].float())[0]
        - images["src"][0])
    assert torch.allclose(rows[-1][0], faded, atol=1e-6)


def panel(figure, row_top, column, line, side):
    """The square panel at (column, line) of the row whose top is row_top, as (side, side, 3)."""
    x = explain.GAP + column * (side + explain.GAP)
    y = row_top + explain.TITLE + line * (explain.CAPTION + side + explain.GAP) + explain.CAPTION
    return torch.from_numpy(np.asarray(figure.crop((x, y, x + side, y + side))).copy())


def expected(image, side):
    """A (3, h, w) image in [-1, 1] as the figure draws it, (side, side, 3) 8-bit."""
    picture = to_pil(pictures.enlarge(image[None].float(), side)[0])
    return torch.from_numpy(np.asarray(picture).copy())


def test_the_layout_holds_with_and_without_swaps(model, images, edits):
    side = 128  # 64 px images enlarged twice
    line = explain.CAPTION + side + explain.GAP  # rows 2 and 4 have one line, row 3 four
    first = 2 if model.default_refine_steps else 1  # row 1: a second line for the fit
    tops = [0, explain.TITLE + first * line, 2 * explain.TITLE + (first + 1) * line,
            3 * explain.TITLE + (first + 5) * line]
    figures = {}
    for name, (arguments, trace, result) in edits.items():
        figure = explain.figure(model, trace, result, images["src"], **arguments)
        figures[name] = figure
        width = explain.COLUMNS * side + (explain.COLUMNS + 1) * explain.GAP
        assert figure.size == (width, tops[3] + explain.TITLE + line)
        assert torch.equal(panel(figure, tops[0], 0, 0, side), expected(images["src"][0], side))
        assert torch.equal(panel(figure, tops[0], 2, 0, side),
                           expected(result["render"][0], side))
        if first == 2:  # I_R of the estimator alone, under the refined one
            assert torch.equal(panel(figure, tops[0], 2, 1, side),
                               expected(trace["unrefined_render"][0], side))
        assert torch.equal(panel(figure, tops[3], 6, 0, side), expected(result["image"][0], side))
        seen = explain.explanation(model, trace, arguments.get("query"))
        for line_number, attention in enumerate(seen["attention"].values()):  # "all" panels
            assert torch.equal(panel(figure, tops[2], 4, line_number, side),
                               expected(pictures.paint(attention)[0], side))
        for column, step in enumerate(explain.trajectory_steps(STEPS)):
            assert torch.equal(panel(figure, tops[3], column, 0, side),
                               expected(seen["x0"][step][0], side))
    tokens = {name: panel(figure, tops[1], 6, 0, side) for name, figure in figures.items()}
    half = side // 2  # quarters: face, hair / clothes, background
    assert torch.equal(tokens["plain"][:half, :half], tokens["hair"][:half, :half])
    assert torch.equal(tokens["plain"][half:], tokens["hair"][half:])
    assert not torch.equal(tokens["plain"][:half, half:], tokens["hair"][:half, half:])
    assert torch.equal(tokens["plain"], tokens["numbers"])


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_sample_explain_writes_the_figure_and_the_same_output(tmp_path):
    common = ["examples/src.png", "examples/qry.png", "--steps=3", "--swap",
              "background=examples/other.png"]
    done = run(*common, f"--out={tmp_path / 'plain.png'}")
    assert done.returncode == 0, done.stderr
    done = run(*common, f"--out={tmp_path / 'out.png'}", f"--explain={tmp_path / 'fig.png'}")
    assert done.returncode == 0 and "fig.png" in done.stdout, done.stderr
    plain, out = (Image.open(tmp_path / name) for name in ("plain.png", "out.png"))
    assert np.array_equal(np.asarray(plain), np.asarray(out))
    assert Image.open(tmp_path / "fig.png").size[0] == explain.COLUMNS * 128 + 8 * explain.GAP
    done = run(*common, "--explain=fig.jpg")
    assert done.returncode == 2 and "--explain fig.jpg: expected a .png" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_slots_and_ldm_stage_grids_show_the_masks(tmp_path):
    stages.write_random_parts(tmp_path, SMALL[:4])
    size, items = 32, 2
    batch = default_collate(SyntheticPortraits(size, "test", length=items).__getitems__(
        range(items)))
    for stage, rows in (("slots", 1), ("ldm", 5)):  # images, then one row per slot and argmax
        options = [o for o in SMALL if stage == "ldm" or not o.startswith("--diffusion")]
        cfg, parts = build_configs(["--stage", stage, *options, f"--out={tmp_path}"])
        built = stages.build(cfg, parts, torch.device("cpu"), n_identities=4).eval()
        if stage == "ldm":
            built.model.set_latent_scale(batch["query"])
        built.evaluate(batch, tmp_path / f"{stage}.png")
        picture = Image.open(tmp_path / f"{stage}.png")
        assert picture.size == (items * size, (rows + len(REGION_NAMES) + 1) * size), stage
