"""Measure DiffFAE against the exact answer: `python evaluate.py [--ckpt PATH] [--n 200]`.

The synthetic test split pairs a source person A with a query person B (held-out identities)
and renders the ground truth: A in B's frame (pose, expression, lighting, camera). Each method
edits the n pairs and is scored against that target:
    psnr, ssim           whole image (metrics.psnr, metrics.ssim)
    psnr_face            PSNR over the target's face pixels
    apd                  pose distance: mean |yaw|, |pitch|, |roll| error in degrees
    aed                  expression distance: mean |Δψ| over expression coefficients and the jaw
                         angle (radians)
    ald                  lighting distance: mean |Δl| over the 27 SH coefficients
    csim                 cosine similarity of identity embeddings, output vs source
apd/aed/ald compare the model's estimator on the output with the exact coefficients of the
target (the analogue of the paper's APD/AED/ALD, DiffFAE §5.1, which use DECA against the query);
csim uses the model's identity encoder (ArcFace's role). The row `ground_truth` scores the target
image itself: the floor of apd/aed/ald that the estimator allows, and the csim a perfect edit
gets. `slot_miou` is the IoU of the model's slot masks on the sources with the true regions,
slots assigned to regions once for the whole set (metrics.slot_iou).
Baselines: `copy_source` (the output is the source) and `paste_render` (the rendered face I_R
pasted over the source where it is drawn).
Extra checkpoints (ablations) are scored as more rows: `--ablation NAME=PATH`.
With --grid PNG it also writes a picture: source | query | I_R | DiffFAE | ground truth, then
the source with the hair, clothes and background of the next item ("other").
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

import metrics
from data import save_image
from difffae import SAMPLERS, load_model
from layers import FACE
from sample import DEFAULT_CHECKPOINT, SWAPPABLE, check_device, check_output, check_sampling
from sample import fail
from slots import masks_at
from stages import to_device, true_coefficients
from synthetic import SyntheticPortraits

CHUNK = 50       # pairs per batch
GRID_ROWS = 6
METRICS = ("psnr", "ssim", "psnr_face", "apd", "aed", "ald", "csim", "slot_miou")


def test_pairs(size, n, seed):
    """n held-out cross-identity pairs, as batches of at most CHUNK."""
    data = SyntheticPortraits(size, "test", seed, length=n)
    for start in range(0, n, CHUNK):
        yield default_collate(data.__getitems__(range(start, min(n, start + CHUNK))))


def image_scores(model, output, batch, against_target=True):
    """Every per-image metric (see the module docstring) of `output` (B, 3, H, W) for a batch of
    test pairs; without the image comparisons when the output is the target itself."""
    target, source = batch["target"], batch["source"]
    estimated, truth = model.estimator(output), true_coefficients(batch, "query")
    expression = torch.cat([estimated["expression"], estimated["pose"][:, 3:]], 1) \
        - torch.cat([truth["expression"], truth["pose"][:, 3:]], 1)  # ψ and the jaw angle
    scores = {"apd": metrics.head_pose_error(estimated["pose"], truth["pose"]).float().mean(1),
              "aed": expression.abs().mean(1).cpu(),
              "ald": (estimated["light"] - truth["light"]).abs().flatten(1).mean(1).cpu(),
              "csim": (model.identity(output) * model.identity(source)).sum(1).cpu()}
    if against_target:
        scores["psnr"] = metrics.psnr(output, target).float()
        scores["ssim"] = metrics.ssim(output, target).float()
        face = (batch["target_regions"] == FACE)[:, None]
        scores["psnr_face"] = metrics.psnr(output, target, mask=face).float()
    return scores


def edit_methods(model, batch, steps, sampler, seed):
    """Outputs (B, 3, H, W) of DiffFAE, the baselines and the ground truth for one batch."""
    source = batch["source"]
    edited = model.edit(source, batch["query"], steps=steps, sampler=sampler, seed=seed)
    return {"difffae": edited["image"], "copy_source": source,
            "paste_render": torch.where(edited["mask"] > 0.5, edited["render"], source),
            "ground_truth": batch["target"]}


@torch.no_grad()
def evaluate(models, n, steps, sampler, seed, device):
    """Mean of every metric for each method: models {row name: DiffFAE}; the first model also
    scores the baselines and the ground truth."""
    sums, counts = {}, {}
    confusion = {name: 0 for name in models}
    first = next(iter(models))
    size = models[first].image_size
    for index, batch in enumerate(test_pairs(size, n, seed)):
        batch = to_device(batch, device)
        for name, model in models.items():
            outputs = edit_methods(model, batch, steps, sampler, seed + index)
            rows = outputs if name == first else {name: outputs["difffae"]}
            for row, output in rows.items():
                scores = image_scores(model, output, batch, against_target=row != "ground_truth")
                for metric, values in scores.items():
                    sums[(row, metric)] = sums.get((row, metric), 0.0) + float(values.sum())
                    counts[(row, metric)] = counts.get((row, metric), 0) + len(values)
            masks = masks_at(model.slots(batch["source"])["masks"], size)
            confusion[name] = confusion[name] + metrics.region_confusion(
                masks.cpu(), batch["source_regions"].cpu())
    results = {}
    for (row, metric), total in sums.items():
        results.setdefault(row, {})[metric] = total / counts[(row, metric)]
    for name in models:
        row = "difffae" if name == first else name
        results[row]["slot_miou"] = float(metrics.slot_iou(confusion[name]).mean())
    return results


@torch.no_grad()
def picture(model, path, steps, sampler, seed, device):
    """The README's grid: one row per held-out pair, edits then region swaps."""
    batch = next(test_pairs(model.image_size, GRID_ROWS + 1, seed))
    batch = to_device(batch, device)
    source, other = batch["source"][:GRID_ROWS], batch["source"][1:GRID_ROWS + 1]
    query = batch["query"][:GRID_ROWS]
    edited = model.edit(source, query, steps=steps, sampler=sampler, seed=seed)
    columns = [source, query, edited["render"], edited["image"], batch["target"][:GRID_ROWS],
               other]
    for region in SWAPPABLE:
        swapped = model.edit(source, swap={region: other}, steps=steps, sampler=sampler,
                             seed=seed)
        columns.append(swapped["image"])
    rows = [torch.cat(list(images), dim=2) for images in zip(*columns)]  # (3, H, 9·W) each
    save_image(torch.cat(rows, dim=1), path)


def markdown(results):
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[m]:.3f}" if m in row else "—" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="model to evaluate (default: the bundled "
                        "weights/difffae-tiny.pt)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=PATH",
                        help="another checkpoint scored as row NAME (repeatable)")
    parser.add_argument("--n", type=int, default=200, help="test pairs")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON "
                        "(missing folders are made)")
    parser.add_argument("--grid", metavar="PNG", help="also write the picture grid (missing "
                        "folders are made)")
    parser.add_argument("--device", default="cpu")
    parser.error = fail  # argparse's errors too: one line, no usage
    args = parser.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n {args.n}: expected at least 1 pair")
        check_device(args.device)
        for path, option, suffix in ((args.json, "--json", None), (args.grid, "--grid", ".png")):
            if path:
                check_output(path, option, suffix)
        models = {"difffae": load_model(args.ckpt or DEFAULT_CHECKPOINT, args.device)}
        for item in args.ablation:
            name, _, path = item.partition("=")
            if not path or name in models:
                raise ValueError(f"--ablation {item}: expected a new NAME=PATH")
            models[name] = load_model(path, args.device)
        sizes = {name: model.image_size for name, model in models.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the checkpoints work at different image sizes: {sizes}")
        for model in models.values():
            check_sampling(model, args.steps, args.sampler)
        started = time.time()
        results = evaluate(models, args.n, args.steps, args.sampler, args.seed, args.device)
        seconds = time.time() - started
        if args.grid:
            picture(models["difffae"], args.grid, args.steps, args.sampler, args.seed,
                    args.device)
    except (ValueError, OSError) as error:
        fail(error)
    print(markdown(results))
    print(f"\n{args.n} pairs, {args.sampler} {args.steps} steps, {seconds:.0f} s")
    if args.json:  # the paths as given, the default one relative to the repository
        config = {key: value for key, value in vars(args).items() if key not in ("json", "grid")}
        here = Path(__file__).resolve().parent
        config["ckpt"] = args.ckpt or str(DEFAULT_CHECKPOINT.relative_to(here))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"methods": results, "n": args.n,
                                               "config": config}, indent=2) + "\n")


if __name__ == "__main__":
    main()
