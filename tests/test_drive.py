"""drive.py and sample.py --drive: the three kinds of clip read in order, bad clips refused in
one line, a clip frame equal to the still edit of that frame, no flicker on a static clip,
smoothing and flicker against their closed forms, and a GIF's one palette. The bundled model
samples from noise here (τ = 1, as the paper does), so that the noise's seeds show."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tools import drive
import sample
from runtime.checkpoint import load_model
from runtime.cli import DEFAULT_CHECKPOINT
from runtime.images import ImageError, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 16    # the frames written here: small, and no resize when read at SIDE
STEPS = 2    # sampler steps in the tests that sample


def colour(k):
    """An RGB colour that tells frame k apart."""
    return (10 * k, 255 - 10 * k, 128)


def expected(k):
    """Frame k of colour(k) as read_clip gives it: (3, SIDE, SIDE) in [-1, 1]."""
    return (torch.tensor(colour(k), dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(
        3, SIDE, SIDE)


def write_frames(folder, names, side=SIDE):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (side, side), colour(k)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def model():
    model = load_model(DEFAULT_CHECKPOINT, "cpu")
    model.diffusion.temperature = 1.0
    return model


@pytest.fixture(scope="module")
def examples(model):
    return {name: load_image(os.path.join(ROOT, "examples", f"{name}.png"), model.image_size)[None]
            for name in ("src", "qry", "other")}


def test_each_kind_of_clip_loads_with_its_frames_in_order(tmp_path):
    # a folder whose names sort by number, not by text: frame2 before frame10
    plain = write_frames(tmp_path / "plain", [f"frame{k}.png" for k in range(12)])
    vox = write_frames(tmp_path / "id10001#abcdefg#000010#000022.mp4",
                       [f"{k:07d}.png" for k in range(12)])
    (plain / ".hidden").write_text("not a frame")  # dot-files are skipped, as FrameFolder does
    gif = tmp_path / "clip.gif"
    drive.write_gif([expected(k) for k in range(12)], gif, fps=25)
    for path in (plain, vox, gif):
        clip = drive.read_clip(path, SIDE)
        assert clip.shape == (12, 3, SIDE, SIDE), path
        for k in range(12):  # 8-bit PNGs and a GIF of 12 colours: exact
            torch.testing.assert_close(clip[k], expected(k), atol=1e-6, rtol=0)
    with Image.open(gif) as opened:
        assert opened.n_frames == 12 and opened.info["duration"] == 40 and opened.info["loop"] == 0
    assert [p for p in sorted(p.name for p in plain.iterdir())][:4] == [
        ".hidden", "frame0.png", "frame1.png", "frame10.png"]  # what a text sort would give


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp.joinpath("empty").mkdir() or tmp / "empty", "empty: no frames"),
    (lambda tmp: write_frames(tmp / "text", ["0.png", "1.png"]).joinpath("notes.txt").write_text(
        "a frame rate") and tmp / "text", "notes.txt: not an image file"),
    (lambda tmp: write_frames(tmp / "one", ["0.png"]), "one: a clip of one frame"),
    (lambda tmp: write_frames(tmp / "sizes", ["0.png", "1.png"]) and Image.new(
        "RGB", (SIDE, 2 * SIDE)).save(tmp / "sizes" / "2.png") or tmp / "sizes",
     "2.png: 16x32, but the clip's first frame"),
    (lambda tmp: Image.new("RGB", (SIDE, SIDE)).save(tmp / "still.gif") or tmp / "still.gif",
     "still.gif: a clip of one frame"),
])
def test_a_bad_clip_is_one_line_naming_it_before_any_sampling(make, message, tmp_path, capsys,
                                                               monkeypatch):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=message):
        drive.read_clip(path, SIDE)

    def refuse(*_, **__):
        raise AssertionError("sampled a bad clip")

    monkeypatch.setattr(drive, "drive", refuse)
    with pytest.raises(SystemExit) as status:
        sample.main([os.path.join(ROOT, "examples", "src.png"), "--drive", str(path),
                     "--out", str(tmp_path / "out.gif")])
    err = capsys.readouterr().err
    assert status.value.code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.gif").exists()


def test_a_clip_frame_is_the_still_edit_of_that_frame(model, examples):
    """The same frame twice gives the same output, and that output is DiffFAE.edit's given the
    same readings: the source's conditions computed once and the shared noise change nothing.
    (The clip fits each frame alone, where an edit fits the query beside the source: the fit
    amplifies the batched kernels' rounding, so those readings differ, docs/driving.md.)"""
    frames = torch.cat([examples["qry"], examples["other"], examples["qry"]])
    steady = drive.drive(model, examples["src"], frames, steps=STEPS)
    readings = [model.fit_coefficients(examples[name]) for name in ("src", "qry")]
    still = model.edit(examples["src"], examples["qry"], steps=STEPS, readings=readings)
    assert torch.equal(steady["image"][0], steady["image"][2])
    torch.testing.assert_close(steady["image"][0], still["image"][0], atol=1e-3, rtol=0)
    torch.testing.assert_close(steady["render"][2], still["render"][0], atol=1e-3, rtol=0)
    assert (steady["image"][1] - steady["image"][0]).abs().mean() > 0.02  # another query
    alone = drive.drive(model, examples["src"], frames, steps=STEPS, same_noise=False)
    assert torch.equal(alone["image"][0], steady["image"][0])  # frame 0 draws seed + 0
    assert (alone["image"][2] - alone["image"][0]).abs().mean() > 0.02  # seed + 2: new noise


def test_a_static_clip_has_no_flicker_with_the_steady_options(model, examples):
    frames = examples["qry"].expand(3, -1, -1, -1)
    steady = drive.drive(model, examples["src"], frames, steps=STEPS, sigma=1.0)["image"]
    assert drive.flicker(steady, frames) == 0
    alone = drive.drive(model, examples["src"], frames, steps=STEPS, same_noise=False)["image"]
    assert drive.flicker(alone, frames) > 0.02
    # refined coefficients (--refine) are fitted frame by frame: still one output, a new I_R
    refined = drive.drive(model, examples["src"], frames, steps=STEPS, refine_steps=2)
    assert drive.flicker(refined["image"], frames) == 0
    unrefined = drive.drive(model, examples["src"], frames[:2], steps=STEPS)["render"]
    assert (refined["render"][0] - unrefined[0]).abs().max() > 1e-3


def test_smoothing_against_its_closed_form():
    sigma, n = 1.0, 11
    impulse = torch.zeros(n, 2, dtype=torch.float64)
    impulse[5, 0] = 1.0
    smoothed = drive.smooth(impulse, sigma)
    weights = [math.exp(-d * d / 2) for d in range(-3, 4)]  # r = ⌈3σ⌉ = 3
    for k in range(n):  # frame k averages its neighbours inside the clip; only frame 5 is 1
        inside = [w for d, w in zip(range(-3, 4), weights) if 0 <= k + d < n]
        want = weights[5 - k + 3] / sum(inside) if abs(5 - k) <= 3 else 0.0
        assert smoothed[k, 0].item() == pytest.approx(want, abs=1e-12), k
    assert (smoothed[:, 1] == 0).all()
    ramp = torch.arange(n, dtype=torch.float64)[:, None] * 0.3 + 2.0
    torch.testing.assert_close(drive.smooth(ramp, 2.0)[6:-6], ramp[6:-6])  # symmetric window
    constant = torch.full((n, 3), 0.1234567, dtype=torch.float32)
    assert torch.equal(drive.smooth(constant, 2.5), constant)  # exactly, not to rounding
    assert drive.smooth(ramp, 0) is ramp


def test_flicker_against_its_closed_form():
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(5, 3, 8, 8, generator=generator) * 2 - 1
    offsets = torch.tensor([0.0, 0.1, -0.2, -0.2, 0.3], dtype=torch.float64)
    outputs = targets + offsets.float().view(-1, 1, 1, 1)  # the target moved by a flat offset
    want = offsets.diff().abs().mean()  # (0.1 + 0.3 + 0 + 0.5) / 4
    assert drive.flicker(outputs, targets).item() == pytest.approx(float(want), abs=1e-6)
    assert drive.flicker(targets, targets) == 0
    still = targets[:1].expand_as(targets)  # a still output: flicker = mean |Δ target|
    assert drive.flicker(still, targets) == pytest.approx(
        float(targets.double().diff(dim=0).abs().mean()), abs=1e-12)


def test_a_gif_has_one_palette_so_a_still_area_stays_still(tmp_path):
    """Frames of far more than 256 colours: a per-frame palette would redraw the still right
    half differently in each frame; one palette keeps it identical."""
    generator = torch.Generator().manual_seed(1)
    ramp = torch.linspace(-1, 1, 32).view(1, 32, 1).expand(3, 32, 16) * torch.tensor(
        [1.0, 0.5, -0.7]).view(3, 1, 1)  # a still gradient
    images = [torch.cat([torch.rand(3, 32, 16, generator=generator) * 2 - 1, ramp], 2)
              for _ in range(4)]
    drive.write_gif(images, tmp_path / "clip.gif", fps=10)
    clip = drive.read_clip(tmp_path / "clip.gif", 32)
    assert clip.shape == (4, 3, 32, 32)
    for k in range(1, 4):
        assert torch.equal(clip[k, :, :, 16:], clip[0, :, :, 16:])
        assert not torch.equal(clip[k, :, :, :16], clip[0, :, :, :16])
    assert (clip[0, :, :, 16:] - ramp).abs().max() < 0.1  # and near the colours written


def test_sample_drive_writes_the_gif_and_the_frames(model, examples, tmp_path, capsys):
    frames = [examples[name][0] for name in ("qry", "other", "qry")]
    drive.write_gif(frames, tmp_path / "clip.gif", fps=25)
    out, folder = tmp_path / "out.gif", tmp_path / "frames"
    sample.main([os.path.join(ROOT, "examples", "src.png"), "--drive", str(tmp_path / "clip.gif"),
                 "--out", str(out), "--frames", str(folder), "--steps", str(STEPS), "--panel",
                 "--smooth", "0", "--temperature", "1"])  # as the model fixture samples
    assert "3 frames" in capsys.readouterr().out
    with Image.open(out) as opened:
        assert opened.size == (4 * model.image_size, model.image_size)
        assert opened.n_frames == 3
    written = drive.read_clip(folder, model.image_size)  # an output folder drives again
    assert written.shape[0] == 3 and torch.equal(written[0], written[2])
    # the result column of the first PNG is the still edit of the GIF's first frame, to 8 bits,
    # each image fitted alone as the clip's are
    query = drive.read_clip(tmp_path / "clip.gif", model.image_size)[:1]
    readings = [model.fit_coefficients(image) for image in (examples["src"], query)]
    still = model.edit(examples["src"], query, steps=STEPS, readings=readings)["image"][0]
    with Image.open(folder / "0000000.png") as opened:
        panel = torch.from_numpy(np.array(opened.convert("RGB"))).permute(2, 0, 1)  # (3, S, 4S)
    result = panel[:, :, 3 * model.image_size:].float() / 127.5 - 1
    assert (result - still).abs().max() <= 1 / 127.5 + 1e-6


def test_sample_help_gives_drive_defaults():
    """sample.py's --help states --smooth's and --fps's defaults, which drive.py holds."""
    text = " ".join(sample.arguments().format_help().split())
    assert f"(default {drive.SMOOTH_SIGMA:g}; 0: none)" in text
    assert f"frames a second (default {drive.FPS:g})" in text
