"""tools/curves.py: the log's evaluation lines read as a resumed run leaves them, the mapping of
(step, value) to pixels, the drawn points where the mapping puts them, and one-line errors."""
import json

import pytest

from tools import curves


def write_log(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_to_pixels_maps_the_ranges_onto_the_box():
    box = (10, 20, 110, 70)  # left, top, right, bottom
    assert curves.to_pixels([0, 50, 100], [1.0, 3.0, 2.0], box) == [
        (10, 70), (60, 20), (110, 45)]
    assert curves.to_pixels([7], [5.0], box) == [(60, 45)]  # one point: the middle
    assert curves.to_pixels([0, 100], [1.0, 2.0], box, limits=(0.0, 4.0)) == [
        (10, 57.5), (110, 45)]


def test_a_flat_curve_gets_the_least_axis_a_steep_one_its_own_range():
    assert curves.axis_range("psnr_face", [17.9, 18.1]) == pytest.approx((17.0, 19.0))
    assert curves.axis_range("face_detail_ratio", [0.45, 0.51]) == pytest.approx((0.38, 0.58))
    assert curves.axis_range("psnr", [15.0, 17.0, 16.0]) == (15.0, 17.0)  # already 2 dB
    assert curves.axis_range("miou", [0.2, 0.9]) == (0.2, 0.9)


def test_read_evaluations_keeps_the_last_line_of_a_step_and_filters_by_every(tmp_path):
    log = write_log(tmp_path / "log.jsonl", [
        {"step": 1000, "eval": {"psnr": 10.0}}, {"step": 1000, "loss": 0.5},
        {"step": 2000, "eval": {"psnr": 11.0}}, {"step": 3000, "eval": {"psnr": 12.0}},
        {"step": 2000, "eval": {"psnr": 11.5}}])  # a resumed run evaluated step 2000 again
    assert curves.read_evaluations(log) == [(1000, {"psnr": 10.0}), (2000, {"psnr": 11.5}),
                                            (3000, {"psnr": 12.0})]
    assert curves.read_evaluations(log, every=2000) == [(2000, {"psnr": 11.5})]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not a JSON line"):
        curves.read_evaluations(tmp_path / "bad.jsonl")


def test_the_points_are_drawn_where_to_pixels_puts_them():
    evaluations = [(1000, {"a": 1.0, "b": 0.50}), (2000, {"a": 4.0, "b": 0.52}),
                   (3000, {"a": 2.0, "b": 0.51})]  # b is flat: its axis is widened
    image = curves.figure(evaluations, ["a", "b"])
    assert image.size == (2 * curves.PANEL[0], curves.PANEL[1])
    box = (curves.MARGIN[0], curves.MARGIN[1], curves.PANEL[0] - curves.MARGIN[2],
           curves.PANEL[1] - curves.MARGIN[3])
    for index, metric in enumerate("ab"):
        values = [result[metric] for _, result in evaluations]
        limits = curves.axis_range(metric, values)
        for x, y in curves.to_pixels([1000, 2000, 3000], values, box, limits):
            assert image.getpixel((round(x) + index * curves.PANEL[0], round(y))) == curves.LINE


def test_errors_are_one_line_naming_the_problem(tmp_path, capsys):
    log = write_log(tmp_path / "log.jsonl", [{"step": 500, "eval": {"psnr": 10.0}}])
    for argv, message in (
            ([str(log), "--metrics", "psnr,nope"],
             "error: --metrics nope: not in the log's evaluations (they have psnr)"),
            ([str(log), "--every", "1000"],
             f"error: {log}: no evaluation lines at multiples of 1000 steps"),
            ([str(tmp_path / "none.jsonl")], f"error: {tmp_path / 'none.jsonl'}: no such log"),
            ([str(log), "--every", "-1"], "error: --every -1: expected a number of steps >= 0")):
        with pytest.raises(SystemExit) as status:
            curves.main([*argv, "--out", str(tmp_path / "c.png")])
        assert status.value.code == 2 and capsys.readouterr().err == message + "\n"
    curves.main([str(log), "--metrics", "psnr", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
