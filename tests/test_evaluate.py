"""evaluate.py against independent references: the exact targets it renders (single-attribute
edits and region swaps), and the program's tables recomputed from their definitions on a tiny
random-weight model (test_difffae.py's fixtures), with its error messages."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import default_collate

from assets.synthetic import SyntheticPortraits, true_coefficients
from difffae import EDIT_ATTRIBUTES, combine_coefficients
from fitting.landmarks import landmark_vertices
from flame import pose6_to_flame15
from layers import FACE, REGION_NAMES
from runtime.checkpoint import load_model
from runtime.cli import SWAPPABLE
from slots import masks_at
from tools import drive, evaluate
from training import metrics, stages
from test_difffae import SIZE, batch, exported, ldm_stage, pretrained  # noqa: F401 (fixtures)


N = 1  # test pairs of the program's run
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return SyntheticPortraits(SIZE, "test", length=2)


def test_own_attribute_renders_the_source_and_another_changes_only_that(data):
    people = [data.identity(data.identity_ids(i)[0]) for i in range(2)]
    own = [data.frame(i, 0) for i in range(2)]
    source, source_regions = data.render(people, own)
    for attribute in EDIT_ATTRIBUTES:
        itself = [evaluate.attribute_frame(f, f, attribute) for f in own]
        image, regions = data.render(people, itself)  # the same batch: the same bits
        assert torch.equal(image, source) and torch.equal(regions, source_regions), attribute
    # as the dataset renders it, in a batch of another size: equal up to float rounding
    items = default_collate(data.__getitems__(range(2)))
    torch.testing.assert_close(items["source"], source, atol=1e-4, rtol=0)
    own, other = data.frame(0, 0), data.frame(0, 1)
    light = evaluate.attribute_frame(own, other, "lighting")
    assert (light["light"] == other["light"]).all() and (light["pose"] == own["pose"]).all()
    pose = evaluate.attribute_frame(own, other, "pose")
    assert (pose["pose"][:3] == other["pose"][:3]).all() and (pose["cam"] == other["cam"]).all()
    assert (pose["pose"][3:] == own["pose"][3:]).all()  # the jaw and the eyes stay A's
    expression = evaluate.attribute_frame(own, other, "expression")
    assert (expression["pose"][6:9] == other["pose"][6:9]).all()  # FLAME's jaw joint
    assert (expression["pose"][9:] == own["pose"][9:]).all()
    assert (expression["expression"] == other["expression"]).all()
    assert (expression["light"] == own["light"]).all()


def test_a_swap_target_differs_from_the_source_only_where_the_region_is(data):
    """Outside A's region R and the swap target's region R, the pixels and their regions are
    A's: a region's parameters move nothing else (occlusions change only R's pixels)."""
    items = default_collate(data.__getitems__(range(2)))
    targets = evaluate.mixed_targets(data, range(2))
    for region in SWAPPABLE:
        k = REGION_NAMES.index(region)
        target = targets[f"swap {region}"]
        union = (items["source_regions"] == k) | (target["regions"] == k)  # (B, H, W)
        assert torch.equal(target["regions"][~union], items["source_regions"][~union])
        outside = ~union[:, None].expand_as(target["image"])
        torch.testing.assert_close(target["image"][outside], items["source"][outside],
                                   atol=1e-4, rtol=0)
        assert (target["image"] != items["source"]).any(1)[union].float().mean() > 0.5, region


def run_main(capsys, *args):
    evaluate.main([str(a) for a in args])
    return capsys.readouterr().out


def test_program_scores_every_table_against_its_definition(exported, pretrained, tmp_path,
                                                            capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "GRID_ROWS", 2)  # the layout of the grid, in a third the time
    out = tmp_path / "results.json"
    other = torch.load(exported, weights_only=True)  # the same model with a different denoiser
    other["weights"]["unet.conv_out.bias"] += 0.5
    torch.save(other, tmp_path / "other.pt")
    printed = run_main(capsys, f"--ckpt={exported}", f"--n={N}", f"--json={out}",
                       f"--grid={tmp_path / 'grid.png'}",
                       f"--ablation=other={tmp_path / 'other.pt'}",
                       f"--slots-ckpt={pretrained / 'slots' / 'ckpt.pt'}",
                       f"--judge_estimator={pretrained / 'estimator' / 'ckpt.pt'}")
    results = json.loads(out.read_text())
    assert results["n"] == N and results["config"]["ckpt"] == str(exported)  # as given
    methods = results["methods"]
    assert set(methods) == {"difffae", "exact_render", "copy_source", "paste_render",
                            "ground_truth", "vq_ceiling", "copy_ceiling", "self_reconstruction",
                            "other"}
    assert methods["other"]["psnr"] != pytest.approx(methods["difffae"]["psnr"])  # its own row
    truth = methods["ground_truth"]
    assert truth["ssim"] == pytest.approx(1.0) and all(
        truth[m] == float("inf") for m in ("psnr", *(f"psnr_{r}" for r in REGION_NAMES)))
    items = default_collate(SyntheticPortraits(SIZE, "test", 0, length=N).__getitems__(range(N)))
    check_methods(methods, load_model(exported), items, pretrained)
    assert set(results["single_attribute"]) == set(EDIT_ATTRIBUTES)
    for rows in results["single_attribute"].values():
        assert set(rows) == {"difffae", "copy_source"}
    for row in results["swaps"].values():
        assert row["gain"] == pytest.approx(row["psnr_region_swap"] - row["psnr_region_no_swap"])
    assert set(results["swaps"]) == set(SWAPPABLE)
    check_slots(results["slots"], items, pretrained)
    check_coefficients(results["coefficients"]["estimator"], load_model(exported), items)
    assert not results["independent_judge"]
    for line in ("| copy_source |", "| hair |", "| slots_ckpt |", "| pose: difffae |",
                 "not an independent judge (give --judge-identity)"):
        assert line in printed, line
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (10 * SIZE * evaluate.GRID_ZOOM,
                                                      2 * SIZE * evaluate.GRID_ZOOM)


def check_methods(methods, model, items, pretrained):
    """The methods table's rows recomputed from their definitions; the edit with the model's
    own sampler and steps, as evaluate.py uses when given none."""
    source, target = items["source"], items["target"]
    with torch.no_grad():
        edited = model.edit(source, items["query"], seed=0)["image"]
    expected = metrics.psnr(edited, target).mean().item()
    assert methods["difffae"]["psnr"] == pytest.approx(expected, rel=1e-5)
    expected = metrics.psnr(source, target).mean().item()
    assert methods["copy_source"]["psnr"] == pytest.approx(expected, rel=1e-5)
    face = (items["target_regions"] == FACE)[:, None]
    expected = metrics.psnr(source, target, mask=face).mean().item()
    assert methods["copy_source"]["psnr_face"] == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        round_trip = model.vqvae.decode(model.vqvae.encode(target)).clamp(-1, 1)
        faces = [source * face, source * (items["source_regions"] == FACE)[:, None]]
        embedded = [model.identity(images) for images in faces]
    expected = metrics.psnr(round_trip, target).mean().item()  # the latent scale cancels
    assert methods["vq_ceiling"]["psnr"] == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # the exact render, pasted where it is drawn, and its round trip
        exact = combine_coefficients(true_coefficients(items, "source"),
                                     true_coefficients(items, "query"))
        out = model.renderer(model.flame(exact["shape"], exact["expression"],
                                         pose6_to_flame15(exact["pose"])),
                             model.flame.albedo(exact["albedo"]), exact["light"], exact["cam"])
        pasted = torch.where(out["mask"] > 0.5, out["image"] * 2 - 1, source)
        copied = model.vqvae.decode(model.vqvae.encode(pasted)).clamp(-1, 1)
    expected = metrics.psnr(copied, target, mask=face).mean().item()
    assert methods["copy_ceiling"]["psnr_face"] == pytest.approx(expected, rel=1e-4)
    expected = (embedded[0] * embedded[1]).sum(1).mean().item()  # the model's own encoder
    assert methods["copy_source"]["csim"] == pytest.approx(expected, rel=1e-5)
    judge, _ = stages.load_part(pretrained, "estimator", "cpu")  # the judge, loaded otherwise
    truth = true_coefficients(items, "query")
    with torch.no_grad():
        read = judge(source)
    expected = metrics.head_pose_error(read["pose"], truth["pose"]).mean().item()
    assert methods["copy_source"]["apd"] == pytest.approx(expected, rel=1e-5)
    expected = (read["light"] - truth["light"]).abs().mean().item()
    assert methods["copy_source"]["ald"] == pytest.approx(expected, rel=1e-5)


def check_coefficients(row, model, items):
    """The coefficients table's camera and landmark errors of the estimator's reading, by hand:
    FLAME's vertices projected with x = (s·(X + t_x) + 1)·W/2, y = (1 − s·(Y + t_y))·W/2."""
    exact = combine_coefficients(true_coefficients(items, "source"),
                                 true_coefficients(items, "query"))
    with torch.no_grad():
        read = combine_coefficients(model.estimator(items["source"]),
                                    model.estimator(items["query"]))
    ids = landmark_vertices(model.flame, evaluate.N_LANDMARKS)
    points = []
    for c in (read, exact):
        with torch.no_grad():
            v = model.flame(c["shape"], c["expression"], pose6_to_flame15(c["pose"]))[:, ids]
        s, t = c["cam"][:, None, :1], c["cam"][:, None, 1:]
        ndc = s * (v[..., :2] + t)  # (B, K, 2)
        points.append(torch.stack([ndc[..., 0] + 1, 1 - ndc[..., 1]], -1) * SIZE / 2)
    expected = (points[0] - points[1]).norm(dim=-1).mean().item()
    assert row["landmarks_px"] == pytest.approx(expected, rel=1e-4)
    s = exact["cam"][:, 0]
    shift = ((read["cam"][:, 1:] - exact["cam"][:, 1:]) ** 2).sum(1).sqrt() * s * SIZE / 2
    assert row["cam_shift_px"] == pytest.approx(shift.mean().item(), rel=1e-5)
    scale = ((read["cam"][:, 0] - s) / s).abs() * 100
    assert row["cam_scale_pct"] == pytest.approx(scale.mean().item(), rel=1e-5)
    assert row["pose_deg_max"] == row["pose_deg_median"] == pytest.approx(row["pose_deg"])


def test_quantile_rows_are_the_quantiles_of_every_pair():
    totals = {}
    for part in (torch.arange(1.0, 6.0), torch.arange(6.0, 11.0)):  # 1, ..., 10 in two batches
        evaluate.add(totals, ("coefficients", "x"), {key: part for key in (
            "pose_deg", "pose_deg_median", "pose_deg_p90", "pose_deg_max")})
    row = evaluate.nest(totals)["coefficients"]["x"]
    # linear interpolation between the order statistics: q·(n − 1) places into the sorted list
    assert row == pytest.approx({"pose_deg": 5.5, "pose_deg_median": 5.5, "pose_deg_p90": 9.1,
                                 "pose_deg_max": 10.0})


def check_slots(slot_rows, items, pretrained):
    """The slots table's row of --slots-ckpt, from the checkpoint loaded otherwise."""
    slots, _ = stages.load_part(pretrained, "slots", "cpu")
    with torch.no_grad():
        masks = masks_at(slots(items["source"])["masks"], SIZE)
    confusion = metrics.region_confusion(masks, items["source_regions"])
    assert slot_rows["slots_ckpt"]["matched_miou"] == pytest.approx(
        metrics.slot_iou(confusion).mean().item())
    assert slot_rows["slots_ckpt"]["fixed_miou"] == pytest.approx(
        metrics.slot_iou(confusion, fixed=True).mean().item())
    assert set(slot_rows) == {"difffae", "other", "slots_ckpt"}


def test_program_refuses_bad_input_in_one_line(exported, pretrained, tmp_path, capsys):
    vqvae = pretrained / "vqvae" / "ckpt.pt"
    truncated = tmp_path / "cut.pt"  # a copy cut short
    truncated.write_bytes(exported.read_bytes()[:1000])
    for args, message in {("--steps=1001",): "--steps 1001: expected 1..1000",
                          ("--sampler=euler",): "invalid choice: 'euler'",
                          ("--sampler=dpm++2m", "--eta=0.5"): "--eta 0.5: applies to the ddim",
                          ("--sampler=ddim", "--eta=2"): "--eta 2.0: expected a value in [0, 1]",
                          ("--n=0",): "--n 0: expected at least 1 pair",
                          ("--device=cuda:99",): "--device cuda:99: this machine has",
                          ("--json", str(tmp_path)): f"--json {tmp_path}: a directory",
                          ("--grid=g.jpg",): "--grid g.jpg: expected a .png file",
                          ("--judge-estimator=no.pt",): "--judge-estimator no.pt: no such",
                          (f"--judge-identity={vqvae}",): "a vqvae checkpoint; expected one "
                                                          "of the identity stage",
                          (f"--slots-ckpt={exported}",): "a non-training checkpoint",
                          (f"--slots_ckpt={truncated}",): f"--slots-ckpt {truncated}: not a "
                                                          "readable checkpoint",
                          (f"--ablation=cut={truncated}",): f"--ablation {truncated}: not a "
                                                            "readable",
                          (f"--json={exported}/r.json",): f"{exported} is a file, not a folder",
                          }.items():
        with pytest.raises(SystemExit) as exit_status:
            evaluate.main([f"--ckpt={exported}", *args])
        captured = capsys.readouterr()
        assert exit_status.value.code == 2 and message in captured.err, captured.err
        assert len(captured.err.strip().splitlines()) == 1, captured.err
        assert not captured.out  # refused before the evaluation, not after


def test_a_damaged_checkpoint_is_one_line_in_a_real_process(exported, tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(exported.read_bytes()[:1000])
    done = subprocess.run([sys.executable, "-m", "tools.evaluate",
                           f"--ckpt={truncated}", "--n=1"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 2 and not done.stdout, done.stderr
    assert done.stderr == (f"error: --ckpt {truncated}: not a readable checkpoint (truncated or "
                           f"not a PyTorch file)\n")


def test_help_shows_the_defaults():
    shown = evaluate.arguments().format_help()
    for default in ("(default: 200)", "(default: the model's own)", "(default: cpu)",
                    "(default: the bundled weights/difffae-tiny.pt)"):
        assert default in " ".join(shown.split()), default


def test_clips_are_scored_against_their_definitions(tmp_path, capsys):
    """evaluate.py --clips with the bundled model, its rows recomputed from the definitions. It
    samples from noise (τ = 1) here: from the bundle's z_T = 0 every seed is the same."""
    path = tmp_path / "clips.json"
    run_main(capsys, "--clips", 1, "--clip-frames", 3, "--steps", 2, "--smooth", 1,
             "--temperature", 1, "--json", path)
    rows = json.loads(path.read_text())["clips"]
    assert set(rows) == {"independent_seeds", "same_noise", "same_noise_smooth_1", "copy_source"}
    model = load_model(evaluate.DEFAULT_CHECKPOINT)
    model.diffusion.temperature = 1.0
    clip = SyntheticPortraits(model.image_size, "test", length=1).clip(0, 3)
    source, target = clip["source"][None], clip["target"]
    still = rows["copy_source"]  # a still output: flicker = mean |Δ target|
    assert still["flicker"] == pytest.approx(float(target.double().diff(dim=0).abs().mean()))
    assert still["psnr"] == pytest.approx(float(metrics.psnr(source.expand_as(target),
                                                             target).mean()))
    for way, options in (("same_noise", {}), ("independent_seeds", dict(same_noise=False))):
        output = drive.drive(model, source, clip["query"], steps=2, **options)["image"]
        assert rows[way]["psnr"] == pytest.approx(float(metrics.psnr(output, target).mean()))
        assert rows[way]["flicker"] == pytest.approx(float(drive.flicker(output, target)))
    assert rows["same_noise"]["flicker"] < rows["independent_seeds"]["flicker"]
    with pytest.raises(SystemExit) as status:
        evaluate.main(["--clips", "1", "--grid", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert status.value.code == 2 and err == "error: --grid: for the pairs; not used with --clips\n"
