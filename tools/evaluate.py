"""Measure DiffFAE against the exact answer: `python -m tools.evaluate [--ckpt PATH] [--n 200]`.

The synthetic test split pairs a source person A with a query person B (held-out identities);
the generator renders any mix of their parameters exactly, so every edit has a true answer and
every lost dB a place. Five tables:

Methods. Scored against the cross-identity target, A in B's frame (pose, expression, lighting,
camera), unless said otherwise:
    difffae              the edit, I_R from the estimator's coefficients (DiffFAE Eq. 3)
    exact_render         the same model given I_R of the EXACT coefficients (A's shape and
                         albedo, B's pose, expression, light, camera): the gap to difffae is
                         the estimator's
    copy_source          the output is the source
    paste_render         the rendered face I_R pasted over the source where it is drawn
    ground_truth         the target itself: infinite PSNR, and the judge's floor
    vq_ceiling           the target through the VQ-VAE and back: no sampler does better
    copy_ceiling         the exact I_R (as exact_render's) pasted over the source, through the
                         VQ-VAE and back: what simply copying the exact render's latent gives;
                         the gap from exact_render to it is the generator's
    self_reconstruction  the model given the source alone (no query), against the SOURCE
Every row has psnr and ssim (whole image; metrics.psnr, metrics.ssim) and psnr_face, psnr_hair,
psnr_clothes, psnr_background over the reference's regions (the target's; the source's for
self_reconstruction), and the face detail ratio and correlation (metrics.face_detail, medians
over the pairs; 1 and 1 for the reference itself). The judge scores every row against the
reference's exact coefficients:
    apd   pose distance: mean |yaw|, |pitch|, |roll| error in degrees
    aed   expression distance: the mean vertex distance in mm of FLAME meshes of ψ and the jaw
          (metrics.expression_distance)
    ald   lighting distance: mean |Δl| over the 27 SH coefficients
    csim  cosine similarity of identity embeddings of the faces alone (metrics.face_only), the
          output's on the reference's face pixels, the source's on its own
(the analogue of DiffFAE §5.1's APD/AED/ALD/CSIM, which read the output with DECA and ArcFace).
The judge is a coefficient estimator and an identity encoder: `--judge-estimator` and
`--judge-identity` name separately trained ones (checkpoints of those training stages); without
them the model's own are used, and the output says that the judge is not independent.
Extra checkpoints (ablations) are scored as more rows: `--ablation NAME=PATH`.

Single attribute. `edit=(attribute,)` edits that alone (difffae.ATTRIBUTE_KEYS: pose = head
rotation and camera; expression = ψ and jaw; lighting = SH light), against A in A's own frame
with only B's attribute; copy_source against the same target shows the gain.

Swaps. For region R (hair, clothes, background): the target is A in A's frame with B's R
parameters; the output is the self-reconstruction with R's slot token from B's image (App. G).
Reported: PSNR inside R (R's pixels in the swap target) with and without the swap, the gain,
and the change of face PSNR (swap vs no swap, each against its own target).

Coefficients. The errors of the coefficients the edit used against the exact ones, for the
estimator alone and, with `--refine N`, refined by the fit (fitting.fit.refine: to the
landmarks of the estimator's detector if it has one, then N photometric steps):
    pose_deg       the geodesic angle between the head rotations (metrics.rotation_error): mean,
                   median, 90th percentile and largest over the pairs
    jaw_deg        |Δ jaw opening| in degrees
    expression_mm  the mean vertex distance of the expression meshes (ψ and the jaw)
    light          mean |Δl| over the 27 SH coefficients
    shape          mean |Δβ| over the shape coefficients
    cam_scale_pct  |Δs| / s in per cent: the head's size in the picture
    cam_shift_px   |Δ(t_x, t_y)| as pixels in the picture: s·|Δt|·W/2
    landmarks_px   the mean distance in pixels between N_LANDMARKS vertices of the face
                   (fitting.landmarks.landmark_vertices) projected by each: where I_R puts the
                   eyes, nose and mouth against where they are
With --refine the methods table's paste_render and difffae rows use the refined coefficients,
and paste_render_estimator pastes the estimator's.

Slots. IoU of the slot masks on the sources with the true regions (metrics.slot_iou): matched
(slots assigned to regions once for the set) and fixed (slot k = region k, the binding the
method uses), for each model's region encoder and a slots-stage checkpoint (`--slots-ckpt`).

With --grid PNG it also writes a picture: source | query | I_R | DiffFAE | DiffFAE handed the
exact I_R (exact_render) | ground truth, then the source with the hair, clothes and background of
the next item ("other").

Clips. `--clips K` scores K synthetic driving clips instead (SyntheticPortraits.clip: person B
moving, the target A in each of B's frames), each driven by drive.drive in these ways:
    independent_seeds    every frame edited alone, frame k from the noise of seed + k
    same_noise           every frame from the same noise, the source's conditions computed once
    same_noise_smooth_σ  and the query's coefficients smoothed over σ frames (with --smooth σ)
    copy_source          the source, still: its flicker is how much the target moves
with psnr, ssim, the region PSNRs and the face detail measures of every frame, the flicker
(drive.flicker, per clip) and the seconds per frame.
"""
import json
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from tools import drive
from training import metrics
from runtime.checkpoint import load_model, rebuild
from runtime.images import save_image
from training.datasets import to_device
from difffae import EDIT_ATTRIBUTES, combine_coefficients
from fitting.landmarks import LandmarkMesh, landmark_vertices
from flame import FLAME, flame15_to_pose6, pose6_to_flame15
from layers import FACE, REGION_NAMES
from runtime.cli import (DEFAULT_CHECKPOINT, SWAPPABLE, Parser, check_device, check_output,
                 check_sampling, check_temperature, fail, read_checkpoint, run, set_temperature)
from samplers import SAMPLERS
from slots import masks_at
from assets.synthetic import SyntheticPortraits, true_coefficients

CHUNK = 50       # pairs per batch
GRID_ROWS = 8
GRID_ZOOM = 2    # the grid's enlargement (nearest): an eye is two or three pixels at 64 px
MEDIANS = ("face_detail_ratio", "face_detail_correlation")  # reported as medians over images
# the pose error's spread: (metric, quantile over the images)
POSE_QUANTILES = {"pose_deg_median": 0.5, "pose_deg_p90": 0.9, "pose_deg_max": 1.0}
QUANTILES = {**{metric: 0.5 for metric in MEDIANS}, **POSE_QUANTILES}
IMAGE_METRICS = ("psnr", "ssim", *(f"psnr_{name}" for name in REGION_NAMES), *MEDIANS)
JUDGE_METRICS = ("apd", "aed", "ald", "csim")
COEFFICIENT_METRICS = ("pose_deg", *POSE_QUANTILES, "jaw_deg", "expression_mm", "light", "shape",
                       "cam_scale_pct", "cam_shift_px", "landmarks_px")
N_LANDMARKS = 68  # the coefficients table's landmarks_px: fitting.landmarks.landmark_vertices
CLIP_METRICS = ("psnr", "ssim", "psnr_face", *MEDIANS, "flicker", "seconds_per_frame")
# Checkpoints of training stages that stand in for a part: the judge's, and slots to score
JUDGES = ("--judge-estimator", "--judge-identity")
STAGE_OF = {"--judge-estimator": "estimator", "--judge-identity": "identity",
            "--slots-ckpt": "slots"}
# FLAME's pose columns that DECA's pose6 holds (global and jaw); neck and eyes are the rest
DECA_JOINTS = pose6_to_flame15(torch.ones(1, 6)).bool()[0]  # (15,)


# -- Targets: mixes of A's and B's parameters, rendered exactly -------------------------------

def attribute_frame(own, other, attribute):
    """Frame `own` (numpy dict, synthetic.sample_frame's) with `other`'s `attribute` alone, in
    difffae.ATTRIBUTE_KEYS's meaning; `own`'s neck and eyes stay (DECA's pose6 has none)."""
    deca = [{**{key: torch.as_tensor(value)[None] for key, value in frame.items()},
             "pose": flame15_to_pose6(torch.as_tensor(frame["pose"])[None])}
            for frame in (own, other)]
    mixed = combine_coefficients(*deca, (attribute,))  # (1, ...) each
    pose = torch.where(DECA_JOINTS, pose6_to_flame15(mixed["pose"])[0],
                       torch.as_tensor(own["pose"]))  # (15,)
    return {**{key: value[0].numpy() for key, value in mixed.items()}, "pose": pose.numpy()}


def mixed_targets(data, indices):
    """{"attribute NAME" | "swap REGION": {"image" (B, 3, H, W), "regions" (B, H, W)}}: A in
    A's source frame with B's attribute, or with B's region parameters, for test items."""
    people = [[data.identity(person) for person in data.identity_ids(i)] for i in indices]
    frames = [[data.frame(i, slot) for slot in (0, 1)] for i in indices]
    kinds = [("attribute", a) for a in EDIT_ATTRIBUTES] + [("swap", r) for r in SWAPPABLE]
    identities, scene_frames = [], []
    for kind, name in kinds:
        for (a, b), (own, other) in zip(people, frames):
            swapped = kind == "swap"
            identities.append({**a, name: b[name]} if swapped else a)
            scene_frames.append(own if swapped else attribute_frame(own, other, name))
    images, regions = data.render(identities, scene_frames)  # (len(kinds)·B, ...)
    n = len(indices)
    return {f"{kind} {name}": {"image": images[k * n:(k + 1) * n],
                               "regions": regions[k * n:(k + 1) * n]}
            for k, (kind, name) in enumerate(kinds)}


# -- Scores ----------------------------------------------------------------------------------

def image_scores(output, reference, regions):
    """psnr, ssim, the region PSNRs and the face detail measures (B,) of `output` against
    `reference` (B, 3, H, W)."""
    return {"psnr": metrics.psnr(output, reference), "ssim": metrics.ssim(output, reference),
            **metrics.region_psnr(output, reference, regions),
            **metrics.face_detail(output, reference, regions)}


def judge_scores(judge, output, regions, truth, source, source_regions):
    """apd, aed, ald, csim (B,) of `output`, whose exact coefficients are `truth` and whose
    reference has `regions`; csim against `source`'s face (see the module docstring)."""
    estimated = judge["estimator"](output)
    faces = [metrics.face_only(output, regions), metrics.face_only(source, source_regions)]
    embedded = [judge["identity"](images) for images in faces]  # (B, D) unit vectors
    return {"apd": metrics.head_pose_error(estimated["pose"], truth["pose"]).mean(1),
            "aed": metrics.expression_distance(judge["flame"], estimated, truth),
            "ald": (estimated["light"] - truth["light"]).abs().flatten(1).mean(1),
            "csim": (embedded[0] * embedded[1]).sum(1)}


def coefficient_scores(flame, coefficients, truth, image_size):
    """The coefficients table's errors (B,) of a coefficient dict against the exact one (module
    docstring)."""
    jaw = (coefficients["pose"][:, 3] - truth["pose"][:, 3]).abs().rad2deg()
    pose = metrics.rotation_error(coefficients["pose"], truth["pose"])
    cam, true_cam = coefficients["cam"], truth["cam"]
    mesh = LandmarkMesh(flame, landmark_vertices(flame, N_LANDMARKS))
    located = [mesh.project(c, image_size) for c in (coefficients, truth)]
    return {"pose_deg": pose, **{metric: pose for metric in POSE_QUANTILES}, "jaw_deg": jaw,
            "expression_mm": metrics.expression_distance(flame, coefficients, truth),
            "light": (coefficients["light"] - truth["light"]).abs().flatten(1).mean(1),
            "shape": (coefficients["shape"] - truth["shape"]).abs().mean(1),
            "cam_scale_pct": 100 * ((cam[:, 0] - true_cam[:, 0]) / true_cam[:, 0]).abs(),
            # a shift of t moves the image by s·t·W/2 pixels (render.project)
            "cam_shift_px": (cam[:, 1:] - true_cam[:, 1:]).norm(dim=1) * true_cam[:, 0]
            * image_size / 2,
            "landmarks_px": (located[0] - located[1]).norm(dim=-1).mean(1)}


def add(totals, path, scores):
    """Sums and counts per metric under `path` (a tuple of table keys), or every value for the
    QUANTILES; NaN (a region an image lacks) is left out."""
    for metric, values in scores.items():
        values = values.detach().double().cpu()
        seen = ~values.isnan()
        if metric in QUANTILES:
            totals.setdefault((*path, metric), []).extend(values[seen].tolist())
            continue
        total = totals.setdefault((*path, metric), [0.0, 0])
        total[0] += float(values[seen].sum())
        total[1] += int(seen.sum())


def score_pairs(totals, model, judge, batch, targets, run, row="difffae", extra_rows=True):
    """Adds one batch's scores to `totals`: the model's edit as `row`, and with extra_rows the
    baselines, the ceilings and the single-attribute and swap tables (module docstring). run:
    the options of DiffFAE.edit (steps, sampler, seed, eta, refine_steps), the same noise for
    every row."""
    source, source_regions, query = batch["source"], batch["source_regions"], batch["query"]
    known = {image: true_coefficients(batch, image) for image in ("source", "query")}
    exact = combine_coefficients(known["source"], known["query"])  # Eq. 3, exactly
    target, regions = batch["target"], batch["target_regions"]
    readings = model.read(source, query, run["refine_steps"])  # once, for every edit below
    edited = model.edit(source, query, readings=readings, **run)
    rows = {row: edited["image"]}
    if extra_rows:
        sampling = {key: value for key, value in run.items() if key != "refine_steps"}
        rendered, mask = model.render(exact)
        cond = model.conditions(source, rendered)
        pasted = torch.where(mask > 0.5, rendered, source)
        rows.update(exact_render=model.decode_latent(model.sample(cond, **sampling)),
                    copy_source=source,
                    paste_render=torch.where(edited["mask"] > 0.5, edited["render"], source),
                    ground_truth=target,
                    vq_ceiling=model.decode_latent(model.encode_latent(target)),
                    copy_ceiling=model.decode_latent(model.encode_latent(pasted)))
        used = {"estimator": combine_coefficients(*model.read(source, query, 0))}
        if run["refine_steps"]:
            used[f"refined ({run['refine_steps']} steps)"] = edited["coefficients"]
            rendered, mask = model.render(used["estimator"])
            rows["paste_render_estimator"] = torch.where(mask > 0.5, rendered, source)
        for name, coefficients in used.items():
            add(totals, ("coefficients", name),
                coefficient_scores(judge["flame"], coefficients, exact, model.image_size))
    for name, output in rows.items():
        add(totals, ("methods", name), {**image_scores(output, target, regions), **judge_scores(
            judge, output, regions, exact, source, source_regions)})
    if not extra_rows:
        return
    alone = readings[:1] + [None]  # the source alone: scored against itself, the swaps' "no swap"
    itself = model.edit(source, readings=alone, **run)["image"]
    add(totals, ("methods", "self_reconstruction"), {
        **image_scores(itself, source, source_regions),
        **judge_scores(judge, itself, source_regions, known["source"], source, source_regions)})
    for attribute in EDIT_ATTRIBUTES:
        mix = targets[f"attribute {attribute}"]
        truth = combine_coefficients(known["source"], known["query"], (attribute,))
        outputs = {"difffae": model.edit(source, query, edit=(attribute,), readings=readings,
                                         **run)["image"], "copy_source": source}
        for name, output in outputs.items():
            add(totals, ("single_attribute", attribute, name), {
                **image_scores(output, mix["image"], mix["regions"]),
                **judge_scores(judge, output, mix["regions"], truth, source, source_regions)})
    face = metrics.psnr(itself, source, mask=(source_regions == FACE)[:, None])
    for region in SWAPPABLE:
        mix = targets[f"swap {region}"]
        inside = (mix["regions"] == REGION_NAMES.index(region))[:, None]  # (B, 1, H, W)
        swapped = model.edit(source, swap={region: query}, readings=alone, **run)["image"]
        add(totals, ("swaps", region), {
            "psnr_region_swap": metrics.psnr(swapped, mix["image"], mask=inside),
            "psnr_region_no_swap": metrics.psnr(itself, mix["image"], mask=inside),
            "psnr_face_change": metrics.psnr(swapped, mix["image"],
                                             mask=(mix["regions"] == FACE)[:, None]) - face})


def slot_scores(confusion):
    """The slots table's row from a network's confusion counts (K, R) over the set; the fixed
    binding only with one slot per region."""
    scores = {"matched_miou": float(metrics.slot_iou(confusion).mean())}
    if confusion.shape[0] == confusion.shape[1]:
        fixed = metrics.slot_iou(confusion, fixed=True)
        scores.update(fixed_miou=float(fixed.mean()),
                      **{f"fixed_{name}": float(iou) for name, iou in zip(REGION_NAMES, fixed)})
    return scores


def nest(totals):
    """{(table, ..., row, metric): [sum, count] or values} → nested dicts of means (medians)."""
    results = {}
    for (*path, metric), total in totals.items():
        node = results
        for key in path:
            node = node.setdefault(key, {})
        if metric in QUANTILES:
            values = torch.tensor(total, dtype=torch.float64)
            node[metric] = float(values.quantile(QUANTILES[metric])) if total else float("nan")
        else:
            node[metric] = total[0] / total[1] if total[1] else float("nan")
    return results


@torch.no_grad()
def evaluate(models, judge, slot_networks, n, steps, sampler, seed, device, refine=0, eta=0.0):
    """Every table of the module docstring as nested dicts: models {row name: DiffFAE}, the
    first of which also fills the extra rows and tables; judge {"estimator", "identity",
    "flame"}; slot_networks {name: RegionSlots} scored besides the models' region encoders."""
    totals = {}
    encoders = {**{name: model.slots for name, model in models.items()}, **slot_networks}
    confusion = dict.fromkeys(encoders, 0)
    first = next(iter(models))
    data = SyntheticPortraits(models[first].image_size, "test", seed, length=n)
    for index, start in enumerate(range(0, n, CHUNK)):
        indices = range(start, min(n, start + CHUNK))
        batch = to_device(default_collate(data.__getitems__(indices)), device)
        targets = to_device(mixed_targets(data, indices), device)
        run = dict(steps=steps, sampler=sampler, seed=seed + index, eta=eta,
                   refine_steps=refine)
        for name, model in models.items():
            first_model = name == first
            score_pairs(totals, model, judge, batch, targets, run,
                        "difffae" if first_model else name, extra_rows=first_model)
        for name, encoder in encoders.items():
            masks = masks_at(encoder(batch["source"])["masks"], data.size)
            confusion[name] = confusion[name] + metrics.region_confusion(
                masks.cpu(), batch["source_regions"].cpu())
    results = nest(totals)
    for row in results["swaps"].values():
        row["gain"] = row["psnr_region_swap"] - row["psnr_region_no_swap"]
    results["slots"] = {name: slot_scores(counts) for name, counts in confusion.items()}
    return results


@torch.no_grad()
def picture(model, path, steps, sampler, seed, device):
    """The README's grid: one row per held-out pair, edits then region swaps."""
    data = SyntheticPortraits(model.image_size, "test", seed, length=GRID_ROWS + 1)
    batch = to_device(default_collate(data.__getitems__(range(GRID_ROWS + 1))), device)
    source, other = batch["source"][:GRID_ROWS], batch["source"][1:GRID_ROWS + 1]
    query = batch["query"][:GRID_ROWS]
    readings = model.read(source, query)
    edited = model.edit(source, query, steps=steps, sampler=sampler, seed=seed, readings=readings)
    exact = combine_coefficients(true_coefficients(batch, "source"),
                                 true_coefficients(batch, "query"))
    cond = model.conditions(source, model.render(exact)[0][:GRID_ROWS])
    handed = model.decode_latent(model.sample(cond, steps=steps, sampler=sampler, seed=seed))
    columns = [source, query, edited["render"], edited["image"], handed,
               batch["target"][:GRID_ROWS], other]
    for region in SWAPPABLE:
        swapped = model.edit(source, swap={region: other}, steps=steps, sampler=sampler,
                             seed=seed, readings=[readings[0], None])
        columns.append(swapped["image"])
    rows = [torch.cat(list(images), dim=2) for images in zip(*columns)]  # (3, H, 10·W) each
    grid = torch.cat(rows, dim=1)[None]
    save_image(torch.nn.functional.interpolate(grid, scale_factor=GRID_ZOOM)[0], path)


@torch.no_grad()
def evaluate_clips(model, n, length, run, sigma, device):
    """The clips table (module docstring) of n clips of `length` frames; run: the sampling
    options of drive.drive (steps, sampler, seed: clip i samples from seed + i)."""
    data = SyntheticPortraits(model.image_size, "test", run["seed"], length=n)
    ways = {"independent_seeds": dict(same_noise=False), "same_noise": {}}
    if sigma:
        ways[f"same_noise_smooth_{sigma:g}"] = dict(sigma=sigma)
    totals = {}
    for index in range(n):
        clip = to_device(data.clip(index, length), device)
        source, target = clip["source"][None], clip["target"]  # (1, 3, H, W), (N, 3, H, W)
        outputs = {"copy_source": source.expand_as(target)}
        for way, options in ways.items():
            started = time.time()
            outputs[way] = drive.drive(model, source, clip["query"], **{
                **run, "seed": run["seed"] + index}, **options)["image"]
            add(totals, ("clips", way), {"seconds_per_frame": torch.tensor(
                [(time.time() - started) / length])})
        for way, output in outputs.items():
            add(totals, ("clips", way), {**image_scores(output, target, clip["target_regions"]),
                                         "flicker": drive.flicker(output, target)[None]})
    return nest(totals)


def load_network(path, stage, option, device):
    """A pretraining stage's network from its training checkpoint (as train.py writes it),
    rebuilt by checkpoint.rebuild. Raises ValueError naming the option, the file and the problem."""
    if not Path(path).is_file():
        raise ValueError(f"{option} {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unsafe-global errors alike
        raise ValueError(f"{option} {path}: not a readable checkpoint "
                         f"({type(error).__name__})") from None
    kind = isinstance(checkpoint, dict) and checkpoint.get("stage")
    if kind != stage:
        raise ValueError(f"{option} {path}: a {kind or 'non-training'} checkpoint; expected "
                         f"one of the {stage} stage")
    try:
        built, _ = rebuild(checkpoint, stage)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(f"{option} {path}: incompatible with this version ({first})") from None
    return built.to(device).eval()


def markdown(rows, columns, label="method"):
    """A markdown table: rows {name: {column: value}}, "—" where a row has no value."""
    lines = [f"| {label} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(results):
    """The five tables of the module docstring, as printed."""
    single = {f"{attribute}: {row}": scores
              for attribute, rows in results["single_attribute"].items()
              for row, scores in rows.items()}
    swap_columns = ("psnr_region_swap", "psnr_region_no_swap", "gain", "psnr_face_change")
    slot_columns = ("matched_miou", "fixed_miou", *(f"fixed_{r}" for r in REGION_NAMES))
    return "\n\n".join([markdown(results["methods"], IMAGE_METRICS + JUDGE_METRICS),
                        markdown(single, IMAGE_METRICS + JUDGE_METRICS, "single attribute"),
                        markdown(results["coefficients"], COEFFICIENT_METRICS, "coefficients"),
                        markdown(results["swaps"], swap_columns, "swap"),
                        markdown(results["slots"], slot_columns, "slots of")])


def arguments():
    """evaluate.py's command line."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=str(DEFAULT_CHECKPOINT),
                        help="model to evaluate (default: the bundled weights/difffae-tiny.pt)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=PATH",
                        help="another checkpoint scored as row NAME (repeatable)")
    parser.add_argument("--judge-estimator", metavar="PATH", help="an estimator-stage "
                        "checkpoint that reads apd/aed/ald (default: the model's own)")
    parser.add_argument("--judge-identity", metavar="PATH", help="an identity-stage "
                        "checkpoint that reads csim (default: the model's own)")
    parser.add_argument("--slots-ckpt", metavar="PATH", help="also score the slot masks of "
                        "this slots-stage checkpoint")
    parser.add_argument("--n", type=int, default=200, help="test pairs (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="(default: the model's own)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic, 1 "
                        "DDPM-like (default: %(default)s)")
    parser.add_argument("--temperature", type=float, metavar="TAU", help="scale of the "
                        "initial noise (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data and the noise (default: %(default)s)")
    parser.add_argument("--refine", type=int, default=None, metavar="N", help="refine the "
                        "coefficients by N steps of the photometric fit (default: the model's "
                        "own, 0 unless it was trained on refined renders)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON "
                        "(missing folders are made)")
    parser.add_argument("--grid", metavar="PNG", help="also write the picture grid (missing "
                        "folders are made)")
    parser.add_argument("--clips", type=int, default=0, help="score this many driving clips "
                        "instead of the pairs (default: none)")
    parser.add_argument("--clip-frames", type=int, default=24, help="frames of each clip "
                        "(default: %(default)s)")
    parser.add_argument("--smooth", type=float, default=drive.SMOOTH_SIGMA, metavar="SIGMA",
                        help="also score the clips with coefficients smoothed over SIGMA frames "
                        "(default: %(default)s, sample.py's; 0: not)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: "
                        "%(default)s)")
    return parser


def load_everything(args):
    """The models {row: DiffFAE}, the judge and the slot networks, after checking every
    argument that needs no checkpoint. Raises ValueError naming the option at fault."""
    if args.n < 1:
        raise ValueError(f"--n {args.n}: expected at least 1 pair")
    if args.refine is not None and args.refine < 0:
        raise ValueError(f"--refine {args.refine}: expected a number of steps >= 0")
    check_temperature(args.temperature)
    check_device(args.device)
    for path, option, suffix in ((args.json, "--json", None), (args.grid, "--grid", ".png")):
        if path:
            check_output(path, option, suffix)
    given = {option: getattr(args, option[2:].replace("-", "_")) for option in STAGE_OF}
    networks = {option: load_network(path, STAGE_OF[option], option, args.device)
                for option, path in given.items() if path}
    models = {"difffae": read_checkpoint(load_model, args.ckpt, "--ckpt", args.device)}
    for item in args.ablation:
        name, _, path = item.partition("=")
        if not path or name in models:
            raise ValueError(f"--ablation {item}: expected a new NAME=PATH")
        models[name] = read_checkpoint(load_model, path, "--ablation", args.device)
    sizes = {**{name: m.image_size for name, m in models.items()},
             **{option: network.cfg.image_size for option, network in networks.items()}}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the checkpoints work at different image sizes: {sizes}")
    for m in models.values():
        check_sampling(m, args.steps, args.sampler, args.eta)
        set_temperature(m, args.temperature)
    model = models["difffae"]
    judge = {"estimator": networks.get("--judge-estimator", model.estimator),
             "identity": networks.get("--judge-identity", model.identity),
             "flame": FLAME().to(args.device)}
    slot_networks = {"slots_ckpt": networks["--slots-ckpt"]} if args.slots_ckpt else {}
    return models, judge, slot_networks


def report(args, results, seconds, independent):
    """Prints the tables and writes --json (the paths as given, the bundled model's relative to
    the repository; the sampler and steps as used)."""
    print(tables(results))
    if not all(independent.values()):
        own = [option for option, given in independent.items() if not given]
        print(f"\njudge: the model's own networks read the outputs, not an independent judge "
              f"(give {' and '.join(own)})")
    refined = f", coefficients refined by {args.refine} steps" if args.refine else ""
    eta = f" (η = {args.eta:g})" if args.sampler == "ddim" else ""
    print(f"\n{args.n} pairs, {args.sampler}{eta} {args.steps} steps at temperature "
          f"{args.temperature:g}{refined}, {seconds:.0f} s")
    write_json(args, {**results, "n": args.n, "independent_judge": all(independent.values())})


def write_json(args, results):
    """--json, if given: the results and the configuration."""
    if args.json:
        config = {key: value for key, value in vars(args).items() if key not in ("json", "grid")}
        if Path(args.ckpt) == DEFAULT_CHECKPOINT:
            root = Path(__file__).resolve().parents[1]
            config["ckpt"] = str(DEFAULT_CHECKPOINT.relative_to(root))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**results, "config": config}, indent=2) + "\n")


def clips_program(args):
    """evaluate.py --clips: its checks, then the clips table, printed and written to --json."""
    if args.clips < 1:
        raise ValueError(f"--clips {args.clips}: expected a number of clips >= 1")
    if args.clip_frames < drive.MIN_FRAMES:
        raise ValueError(f"--clip-frames {args.clip_frames}: a clip needs at least "
                         f"{drive.MIN_FRAMES}")
    if not 0 <= args.smooth < float("inf"):
        raise ValueError(f"--smooth {args.smooth}: expected a number of frames >= 0")
    pairs_only = [option for option in ("--grid", "--ablation", "--refine", "--eta", *STAGE_OF)
                  if getattr(args, option[2:].replace("-", "_"))]
    if pairs_only:
        raise ValueError(f"{', '.join(pairs_only)}: for the pairs; not used with --clips")
    check_device(args.device)
    check_temperature(args.temperature)
    if args.json:
        check_output(args.json, "--json")
    model = read_checkpoint(load_model, args.ckpt, "--ckpt", args.device)
    check_sampling(model, args.steps, args.sampler)
    set_temperature(model, args.temperature)
    args.sampler = args.sampler or model.diffusion.sampler
    args.steps = args.steps or model.diffusion.sample_steps
    started = time.time()
    results = evaluate_clips(model, args.clips, args.clip_frames,
                             dict(steps=args.steps, sampler=args.sampler, seed=args.seed),
                             args.smooth, args.device)
    print(markdown(results["clips"], CLIP_METRICS, "clip"))
    print(f"\n{args.clips} clips of {args.clip_frames} frames, {args.sampler} {args.steps} "
          f"steps, {time.time() - started:.0f} s")
    write_json(args, results)


def main(argv=None):
    args = arguments().parse_args(argv)
    try:
        if args.clips:
            return clips_program(args)
        models, judge, slot_networks = load_everything(args)
        diffusion = models["difffae"].diffusion  # the model's own sampling where none is given
        args.sampler = args.sampler or diffusion.sampler
        args.steps = args.steps or diffusion.sample_steps
        args.temperature = diffusion.temperature
        if args.refine is None:
            args.refine = models["difffae"].default_refine_steps
        started = time.time()
        results = evaluate(models, judge, slot_networks, args.n, args.steps, args.sampler,
                           args.seed, args.device, args.refine, args.eta)
        seconds = time.time() - started
        if args.grid:
            picture(models["difffae"], args.grid, args.steps, args.sampler, args.seed,
                    args.device)
    except (ValueError, OSError) as error:
        fail(error)
    report(args, results, seconds, {option: getattr(args, option[2:].replace("-", "_"))
                                    is not None for option in JUDGES})


if __name__ == "__main__":
    run(main)
