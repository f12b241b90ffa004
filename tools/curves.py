"""Learning curves of a training run: `python -m tools.curves RUN/log.jsonl --out curves.png`.

Every stage writes its held-out evaluation into its log.jsonl every `eval_every` steps (train.py),
one line {"step": s, "eval": {metric: value}}. This draws the chosen metrics against the step,
one panel each, side by side: the values as dots joined by lines, the first and last labelled.
The vertical axis runs from the least value to the greatest, widened about its middle to at least
2 dB for a PSNR and 0.2 for any other metric, so that a flat curve's noise draws as noise and
not as a trend. `--every N` keeps only the evaluations at multiples of N steps. The ldm stage's
metrics (training/stages.py): psnr and psnr_face of its edits, face_detail_ratio and
face_detail_correlation, and x0_follows_f_r_t<t>, how far x̂_0 at step t follows the render I_R.
"""
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from runtime.cli import Parser, check_output, fail, run

PANEL = (260, 170)  # px of one panel
MARGIN = (44, 26, 12, 24)  # px of a panel left, top, right, bottom of its plot box
MIN_SPAN_DB, MIN_SPAN = 2.0, 0.2  # the least height of a panel's axis: a PSNR's, any other's
DEFAULT_METRICS = ("psnr", "psnr_face", "face_detail_ratio", "face_detail_correlation",
                   "x0_follows_f_r_t400")
INK, PAPER, GRID, LINE = (20, 20, 20), (255, 255, 255), (225, 225, 225), (200, 70, 20)


def read_evaluations(path, every=0):
    """[(step, {metric: value})] of the "eval" lines of a log.jsonl, in step order (a resumed
    run's repeated steps keep their last line)."""
    evaluations = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {number}: not a JSON line") from None
        if "eval" in entry and (not every or entry["step"] % every == 0):
            evaluations[entry["step"]] = entry["eval"]
    return sorted(evaluations.items())


def axis_range(metric, values):
    """(low, high) of a panel's vertical axis: the values' range, widened about its middle to
    MIN_SPAN_DB for a PSNR (a metric named psnr...) and to MIN_SPAN for any other."""
    low, high = min(values), max(values)
    span = MIN_SPAN_DB if metric.startswith("psnr") else MIN_SPAN
    middle = (low + high) / 2
    return min(low, middle - span / 2), max(high, middle + span / 2)


def to_pixels(steps, values, box, limits=None):
    """(x, y) of each (step, value) in box = (left, top, right, bottom): the first step at the
    left edge, the last at the right, limits = (low, high) of the values at the bottom and the
    top (by default the least value and the greatest; a single step or a constant value in the
    middle)."""
    left, top, right, bottom = box
    low, high = limits or (min(values), max(values))

    def scale(value, least, most, start, end):
        return (start + end) / 2 if most == least else start + (value - least) / (
            most - least) * (end - start)
    return [(scale(s, min(steps), max(steps), left, right),
             scale(v, low, high, bottom, top)) for s, v in zip(steps, values)]


def panel(metric, steps, values):
    """One metric's curve, titled, with its axis' ends and first and last steps marked."""
    image = Image.new("RGB", PANEL, PAPER)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    box = (MARGIN[0], MARGIN[1], PANEL[0] - MARGIN[2], PANEL[1] - MARGIN[3])
    draw.rectangle(box, outline=GRID)
    draw.text((MARGIN[0], 6), metric, fill=INK, font=font)
    low, high = axis_range(metric, values)
    for value, y in ((high, box[1]), (low, box[3])):
        draw.text((4, y - 6), f"{value:.3g}", fill=INK, font=font)
    for step, x, anchor in ((steps[0], box[0], "la"), (steps[-1], box[2], "ra")):
        draw.text((x, box[3] + 5), f"{step:,}", fill=INK, font=font, anchor=anchor)
    points = to_pixels(steps, values, box, (low, high))
    if len(points) > 1:
        draw.line(points, fill=LINE, width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=LINE)
    return image


def figure(evaluations, metrics):
    """The panels of `metrics` side by side; a metric missing from every evaluation is refused."""
    panels = []
    for metric in metrics:
        seen = [(step, result[metric]) for step, result in evaluations if metric in result]
        if not seen:
            known = sorted({name for _, result in evaluations for name in result})
            raise ValueError(f"--metrics {metric}: not in the log's evaluations (they have "
                             f"{', '.join(known)})")
        panels.append(panel(metric, *zip(*seen)))
    image = Image.new("RGB", (PANEL[0] * len(panels), PANEL[1]), PAPER)
    for index, picture in enumerate(panels):
        image.paste(picture, (index * PANEL[0], 0))
    return image


def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="a stage's log.jsonl (<out>/<stage>/log.jsonl)")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help="comma-separated metrics of the evaluations (default: %(default)s)")
    parser.add_argument("--every", type=int, default=0, metavar="N",
                        help="only the evaluations at multiples of N steps")
    args = parser.parse_args(argv)
    try:
        if args.every < 0:
            raise ValueError(f"--every {args.every}: expected a number of steps >= 0")
        check_output(args.out, "--out", ".png")
        if not Path(args.log).is_file():
            raise ValueError(f"{args.log}: no such log")
        evaluations = read_evaluations(args.log, args.every)
        if not evaluations:
            where = f" at multiples of {args.every} steps" if args.every else ""
            raise ValueError(f"{args.log}: no evaluation lines{where}")
        image = figure(evaluations, [m for m in args.metrics.split(",") if m])
    except (ValueError, OSError) as error:
        fail(error)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out}: {len(evaluations)} evaluations, steps {evaluations[0][0]:,} to "
          f"{evaluations[-1][0]:,}")


if __name__ == "__main__":
    run(main)
