"""sample.py and the command-line helpers the programs share (cli.py), on real processes where
the behaviour is the process's: Ctrl-C, exit statuses, the one line of an error."""
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from runtime import cli
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def program(*args, **kwargs):
    """sample.py as a process. Its Ctrl-C is restored to the default even where the tests run
    with SIGINT ignored (a shell's background job: its children inherit the ignoring, and Python
    then leaves KeyboardInterrupt off)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)


def test_ctrl_c_during_an_edit_is_one_line_and_status_130(tmp_path):
    # an 8 px source is enlarged 8x: the warning says the process is past its imports and its
    # model, reading the images; the edit then takes 1000 DDIM steps
    Image.new("RGB", (8, 8), (200, 150, 120)).save(tmp_path / "small.png")
    editing = program(tmp_path / "small.png", "examples/qry.png", "--sampler=ddim",
                      "--steps=1000", f"--out={tmp_path / 'out.png'}")
    warning = editing.stderr.readline()
    assert "enlarged 8x" in warning, warning
    editing.send_signal(signal.SIGINT)
    out, err = editing.communicate(timeout=120)
    assert editing.returncode == 130 and err == "interrupted\n" and not out, err
    assert not (tmp_path / "out.png").exists()


def test_a_damaged_checkpoint_is_one_line_and_status_2(tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(cli.DEFAULT_CHECKPOINT.read_bytes()[:1000])  # cut short
    not_torch = tmp_path / "text.pt"
    not_torch.write_text("weights\n")
    for path in (truncated, not_torch):
        out, err = program("examples/src.png", "examples/qry.png", f"--ckpt={path}",
                           f"--out={tmp_path / 'out.png'}").communicate(timeout=120)
        assert err.startswith(f"error: --ckpt {path}: not a readable checkpoint"), err
        assert len(err.splitlines()) == 1 and not out


@pytest.mark.parametrize("args, message", [
    (("--set", "smile=nan"), "--set smile=nan: expected a finite number"),
    (("--set", "yaw=inf"), "--set yaw=inf: expected a finite number"),
    (("--set", "light=1,-inf,0"), "--set light=1,-inf,0: expected a finite number"),
    (("--out", "examples/src.png/x.png"), "examples/src.png is a file, not a folder"),
    (("--explain", "examples/src.png/deeper/x.png"), "--explain examples/src.png/deeper/x.png"),
    (("--refine", "-1"), "--refine -1: expected 0 to 1000 steps"),
    (("--refine", "100000"), "--refine 100000: expected 0 to 1000 steps"),
    (("--temperature", "-0.5"), "--temperature -0.5: expected a number >= 0"),
    (("--temperature", "nan"), "--temperature nan: expected a number >= 0"),
    (("--smooth", "3"), "--smooth 3.0: an option of --drive; give a clip"),
    (("--fps", "5"), "--fps 5.0: an option of --drive; give a clip"),
    (("--set", "yaw=10", "--set", "yaw=20"), "--set yaw given twice: give each number once"),
    (("--swap", "hair=examples/other.png", "--swap", "hair=examples/src.png"),
     "--swap hair given twice (examples/other.png, examples/src.png): give each region once"),
])
def test_bad_arguments_are_refused_before_the_model_loads(args, message, capsys, monkeypatch):
    def refuse(*_):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sample, "load_model", refuse)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_status:
        sample.main(["examples/src.png", "examples/qry.png", *args])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and message in err, err
    assert len(err.splitlines()) == 1 and "Errno" not in err


def test_check_output_refuses_what_cannot_be_written(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    for path, problem in ((tmp_path / "file.png" / "a" / "b.png", "is a file, not a folder"),
                          (tmp_path, "a directory"), (tmp_path / "x.jpg", "expected a .png"),
                          ("/proc/x.png", "cannot write in the folder /proc")):
        with pytest.raises(ValueError, match="--out .*" + problem) as refused:
            cli.check_output(path, "--out", ".png")
        assert "Errno" not in str(refused.value)
    cli.check_output(tmp_path / "new" / "folders" / "x.png", "--out", ".png")  # made later
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == [tmp_path / "file.png"]


def test_both_spellings_of_multi_word_options():
    parser = cli.Parser()
    parser.add_argument("--judge-estimator")
    parser.add_argument("name")
    for argv in (["--judge-estimator", "a_b.pt", "x_y"], ["--judge_estimator=a_b.pt", "x_y"]):
        args = parser.parse_args(argv)
        assert (args.judge_estimator, args.name) == ("a_b.pt", "x_y")  # values kept as given


def test_sizes_past_the_bound_are_refused_before_the_edit(capsys, monkeypatch):
    """--panel --zoom 400 would be a 102,400 px strip: one line, before any sampling."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sample, "save_image", lambda *_: pytest.fail("an image was written"))
    with pytest.raises(SystemExit) as exit_status:
        sample.main(["examples/src.png", "examples/qry.png", "--panel", "--zoom", "400"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2
    assert err == "error: --zoom 400: the output would be 102400 px wide; expected at most 4096\n"


def test_what_the_bundled_model_never_saw_is_said_in_one_line(tmp_path):
    """A photograph (here a JPEG of another shape) and a number outside the synthetic portraits'
    range each get one warning line; the examples, square PNG portraits, get none."""
    Image.new("RGB", (96, 64), (200, 150, 120)).save(tmp_path / "photo.jpg")
    out = tmp_path / "out.png"
    _, err = program("examples/src.png", "examples/qry.png", f"--out={out}").communicate(60)
    assert "warning" not in err, err
    _, err = program(tmp_path / "photo.jpg", "examples/qry.png", f"--out={out}", "--set",
                     "yaw=3000").communicate(timeout=60)
    assert err.splitlines() == [
        "warning: --set yaw=3000: outside what the synthetic portraits hold (-40 to 40): a model "
        "trained on them never saw such a face",
        f"warning: {tmp_path / 'photo.jpg'} is a 96 × 64 JPEG, not a square PNG like the bundled "
        f"model's synthetic portraits: it never saw a photograph, so expect a melted face "
        f"(docs/real-data.md: training on real frames)"]
