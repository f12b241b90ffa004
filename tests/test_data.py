"""Tests for runtime/images.py and training/datasets.py: load_image / save_image against
hand-computed pixel values, FrameFolder on tiny vox-png and plain-folder fixtures built here
(layout, pairing rules, determinism, cache)."""
import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import images
from runtime.images import ImageError, load_image, save_image
from training.datasets import FrameFolder

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


def to_unit(values) -> torch.Tensor:
    """8-bit levels → the [-1, 1] values load_image should give, computed independently."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64) / 255.0 * 2.0 - 1.0)


def colour_of(image: torch.Tensor, row: int, col: int) -> torch.Tensor:
    return image[:, row, col].double()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# ---------------------------------------------------------------------------------- load_image


def test_rgb_png_round_trip_is_exact(tmp_path):
    levels = np.random.default_rng(0).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    Image.fromarray(levels).save(tmp_path / "rgb.png")
    image = load_image(tmp_path / "rgb.png", 12)
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32
    expected = to_unit(levels).permute(2, 0, 1)  # (3, H, W)
    torch.testing.assert_close(image.double(), expected, atol=1e-6, rtol=0)


def test_rgba_composites_over_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 200, 30, 0)  # fully transparent: white whatever its colour
    rgba[0, 1] = (200, 10, 30, 255)  # opaque: its own colour
    rgba[0, 2] = (0, 0, 0, 128)  # half black over white: 1 − 128/255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png", 8)
    torch.testing.assert_close(colour_of(image, 0, 0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(colour_of(image, 0, 1), to_unit([200, 10, 30]))
    half = 2.0 * (1.0 - 128.0 / 255.0) - 1.0
    torch.testing.assert_close(colour_of(image, 0, 2), torch.full((3,), half, dtype=torch.float64))


def test_grey_and_grey_alpha(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(grey).save(tmp_path / "l.png")
    image = load_image(tmp_path / "l.png", 8)
    for c in range(3):
        torch.testing.assert_close(image[c].double(), to_unit(grey))
    la = Image.fromarray(grey).convert("LA")
    la.putalpha(Image.fromarray(np.where(grey > 90, 255, 0).astype(np.uint8)))
    la.save(tmp_path / "la.png")
    image = load_image(tmp_path / "la.png", 8)
    expected = to_unit(np.where(grey > 90, grey, 255))  # transparent → white
    torch.testing.assert_close(image[1].double(), expected)


def test_palette_with_and_without_transparency(tmp_path):
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    palette = list(RED) + list(GREEN) + [0] * (3 * 254)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(palette)
    picture.save(tmp_path / "p.png")
    picture.save(tmp_path / "pt.png", transparency=1)
    opaque = load_image(tmp_path / "p.png", 8)
    torch.testing.assert_close(colour_of(opaque, 3, 0), to_unit(RED))
    torch.testing.assert_close(colour_of(opaque, 3, 7), to_unit(GREEN))
    clear = load_image(tmp_path / "pt.png", 8)
    torch.testing.assert_close(colour_of(clear, 3, 0), to_unit(RED))
    torch.testing.assert_close(colour_of(clear, 3, 7), torch.ones(3, dtype=torch.float64))


def test_sixteen_bit_png_uses_the_full_range(tmp_path):
    levels = np.zeros((8, 8), dtype=np.uint16)
    levels[0, 1] = 32768
    levels[0, 2] = 65535
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = load_image(tmp_path / "g16.png", 8)
    assert torch.all(image[:, 0, 0] == -1.0)
    torch.testing.assert_close(image[:, 0, 1].double(),
                               torch.full((3,), 32768 / 65535 * 2 - 1, dtype=torch.float64))
    assert abs(float(image[0, 0, 1])) < 1e-4
    assert torch.all(image[:, 0, 2] == 1.0)


def test_cmyk_converts_to_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")  # no cyan/K: red
    image = load_image(tmp_path / "cmyk.tif", 8)
    torch.testing.assert_close(colour_of(image, 4, 4), to_unit(RED))


def test_exif_orientation_six_rotates_clockwise(tmp_path):
    stored = np.zeros((20, 30, 3), dtype=np.uint8)  # 30 wide, 20 tall
    stored[:4] = RED  # top band
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the top band becomes the right band
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    upright = load_image(tmp_path / "rotated.png", 20)  # displayed 20 × 30, crop rows 5..24
    assert torch.all(upright[0, :, -4:] == 1.0) and torch.all(upright[1, :, -4:] == -1.0)
    assert torch.all(upright[:, :, :-4] == -1.0)
    plain = load_image(tmp_path / "plain.png", 20)  # control: no tag, band stays on top
    assert torch.all(plain[0, :4, :] == 1.0) and torch.all(plain[:, 4:, :] == -1.0)


@pytest.mark.parametrize("wide", [True, False])
def test_centre_crop_keeps_the_middle(tmp_path, wide):
    thirds = np.zeros((20, 40, 3), dtype=np.uint8)
    thirds[:, :10] = RED
    thirds[:, 10:30] = GREEN
    thirds[:, 30:] = BLUE
    if not wide:
        thirds = np.ascontiguousarray(thirds.transpose(1, 0, 2))  # 20 wide, 40 tall
    Image.fromarray(thirds).save(tmp_path / "thirds.png")
    image = load_image(tmp_path / "thirds.png", 20)
    expected = to_unit(GREEN).float()[:, None, None].expand(3, 20, 20)
    torch.testing.assert_close(image, expected)


def test_resize_shape_constant_and_antialiasing(tmp_path):
    Image.new("RGB", (37, 37), (40, 120, 200)).save(tmp_path / "flat.png")
    flat = load_image(tmp_path / "flat.png", 16)
    assert flat.shape == (3, 16, 16) and flat.dtype == torch.float32
    expected = to_unit([40, 120, 200]).float()[:, None, None].expand(3, 16, 16)
    torch.testing.assert_close(flat, expected, atol=1e-5, rtol=0)  # a filter keeps a constant
    rows, cols = np.indices((64, 64))
    checker = (((rows + cols) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "checker.png")
    small = load_image(tmp_path / "checker.png", 16)
    # a 1-pixel checkerboard is above the new Nyquist rate: an antialiased resize gives mid-grey
    # (0 in [-1, 1]); point sampling would give ±1
    assert small.abs().max() < 0.05
    up = load_image(tmp_path / "flat.png", 64)
    assert up.shape == (3, 64, 64)


def _png_with_width_zero(path):
    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    header = struct.pack(">IIBBBBB", 0, 4, 8, 2, 0, 0, 0)  # width 0, height 4, 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _make_bad(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)) \
            .save(path)
        full = path.read_bytes()
        path.write_bytes(full[:len(full) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "width_zero":
        _png_with_width_zero(path)
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "truncated", "empty",
                                  "width_zero"])
def test_bad_files_raise_one_line_image_error(tmp_path, kind):
    path = _make_bad(tmp_path, kind)
    with pytest.raises(ImageError) as caught:
        load_image(path, 16)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("size", [0, 7, 5000, "x", 16.0, True, None])
def test_bad_size_names_file_and_value(tmp_path, size):
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "ok.png", size)
    assert str(tmp_path / "ok.png") in str(caught.value) and repr(size) in str(caught.value)


def test_a_large_enlargement_warns(tmp_path):
    Image.new("RGB", (3, 2), RED).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny.png: 3x2 enlarged 8x to 16x16"):
        image = load_image(tmp_path / "tiny.png", 16)
    assert torch.allclose(image, to_unit(RED)[:, None, None].float())  # and still loads
    Image.new("RGB", (4, 4), RED).save(tmp_path / "small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4x is MAX_UPSCALE: allowed without a word
        load_image(tmp_path / "small.png", 16)


def test_pixel_limit(tmp_path, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 255)  # 16 × 16 = 256 pixels: one too many
    with pytest.raises(ImageError, match="16x16 is more than the limit.*shrink it") as refused:
        load_image(tmp_path / "big.png", 16)
    assert "bomb" not in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 256)
    assert load_image(tmp_path / "big.png", 16).shape == (3, 16, 16)
    assert Image.MAX_IMAGE_PIXELS is None  # Pillow's own check, worded otherwise, is off


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    # a smooth 400 × 400 picture: its 1/8-scale DCT decode (50 × 50), resized to 32, is close to
    # the full decode resized to 32; above the limit only the reduced decode fits
    ramp = np.linspace(0, 255, 400)
    pixels = np.stack([ramp[None, :].repeat(400, 0), ramp[:, None].repeat(400, 1),
                       np.full((400, 400), 128.0)], 2).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)
    full = load_image(tmp_path / "big.jpg", 32)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50 * 50)
    reduced = load_image(tmp_path / "big.jpg", 32)
    assert (reduced - full).abs().mean() < 0.02 and (reduced - full).abs().max() < 0.1
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50 * 50 - 1)  # 1/8 is the smallest scale
    with pytest.raises(ImageError, match="50x50 is more than the limit"):
        load_image(tmp_path / "big.jpg", 32)


def test_save_image_round_trip_and_checks(tmp_path):
    levels = torch.randint(0, 256, (3, 10, 10), generator=torch.Generator().manual_seed(2))
    image = levels.double() / 255 * 2 - 1
    image[0, 0, 0] = 3.0  # out of range: clamped to 1
    path = tmp_path / "new" / "dir" / "out.png"
    save_image(image, path)
    again = load_image(path, 10)
    torch.testing.assert_close(again.double(), image.clamp(-1, 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="png"):
        save_image(image, tmp_path / "out.jpg")
    with pytest.raises(ValueError, match="3, H, W"):
        save_image(image[None], tmp_path / "b.png")
    with pytest.raises(ValueError, match="NaN"):
        save_image(torch.full((3, 4, 4), float("nan")), tmp_path / "n.png")


# ---------------------------------------------------------------------------------- FrameFolder

VOX_CLIPS = {  # clip folder → number of frames
    "idA#yt1#000000#000030.mp4": 3,
    "idA#yt2#000010#000040.mp4": 2,
    "idB#yt3#000000#000020.mp4": 2,
    "idB#yt4#000005#000025.mp4": 1,  # too short: skipped
}


def frame_colour(clip_index: int, frame_index: int):
    return (40 * clip_index, 40 * frame_index, 100)


def add_clip(split_dir, name, n_frames, clip_index, suffix=".png"):
    clip = split_dir / name
    clip.mkdir(parents=True)
    for f in range(n_frames):
        Image.new("RGB", (8, 8), frame_colour(clip_index, f)).save(clip / f"{f:07d}{suffix}")
    return clip


def make_vox(root):
    for c, (name, n) in enumerate(VOX_CLIPS.items()):
        add_clip(root / "train", name, n, c)
    return root


def decode_colour(path):
    """The (clip, frame) a fixture frame was made for, from its file path."""
    clip = list(VOX_CLIPS).index(os.path.basename(os.path.dirname(path)))
    return frame_colour(clip, int(os.path.basename(path)[:7]))


def build(root, **kwargs):
    with pytest.warns(UserWarning, match="skipped 1 clip"):
        return FrameFolder(root, size=8, **kwargs)


def test_vox_items(tmp_path):
    root = make_vox(tmp_path / "vox")
    with pytest.warns(UserWarning) as record:
        dataset = FrameFolder(root, size=8)
    assert len(record) == 1 and "idB#yt4#000005#000025.mp4" in str(record[0].message)
    assert len(dataset) == 3 and dataset.identities == ["idA", "idB"]
    assert [c[0] for c in dataset.clips] == ["idA", "idA", "idB"]
    for i in range(len(dataset)):
        item = dataset[i]
        assert set(item) == {"source", "query", "identity", "source_path", "query_path"}
        assert item["source"].shape == (3, 8, 8) and item["query"].dtype == torch.float32
        assert item["source_path"] != item["query_path"]
        assert os.path.dirname(item["source_path"]) == os.path.dirname(item["query_path"])
        clip_name = os.path.basename(os.path.dirname(item["source_path"]))
        assert dataset.identities[item["identity"]] == clip_name.split("#")[0]
        for key in ("source", "query"):
            expected = to_unit(decode_colour(item[f"{key}_path"])).float()
            torch.testing.assert_close(item[key][:, 3, 3], expected)
    assert dataset[-1]["source_path"] == dataset[2]["source_path"]
    with pytest.raises(IndexError):
        dataset[3]


def test_items_are_deterministic_and_depend_on_seed(tmp_path):
    root = make_vox(tmp_path / "vox")
    first, second = build(root), build(root)
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert (a["source_path"], a["query_path"]) == (b["source_path"], b["query_path"])
        assert torch.equal(a["source"], b["source"]) and torch.equal(a["query"], b["query"])
    pairs = set()
    for seed in range(12):
        item = build(root, seed=seed)[0]
        pairs.add((item["source_path"], item["query_path"]))
    assert len(pairs) > 1  # clip 0 has 3 · 2 = 6 ordered pairs; the seed must matter


def test_draws_give_each_clip_pairs_of_its_own(tmp_path):
    """With draws = D, item i is clip i mod 3, and its D items cover the clip's pairs."""
    root = make_vox(tmp_path / "vox")
    dataset = build(root, draws=12)
    assert len(dataset) == 3 * 12
    pairs = set()
    for draw in range(12):
        item = dataset[3 * draw]  # clip 0: 3 frames, 6 ordered pairs
        assert os.path.dirname(item["source_path"]) == dataset.clips[0][1]
        pairs.add((item["source_path"], item["query_path"]))
    assert len(pairs) > 1
    assert {dataset[3 * d + 2]["identity"] for d in range(12)} == {1}  # clip 2 is idB's


def test_plain_folder_layouts(tmp_path):
    for root, split_dir in ((tmp_path / "a", tmp_path / "a" / "train"), (tmp_path / "b", None)):
        base = split_dir if split_dir is not None else root
        add_clip(base, "alice", 2, 0, suffix=".jpg")
        add_clip(base, "bob", 3, 1)
        dataset = FrameFolder(root, split="train", size=8)
        assert dataset.identities == ["alice", "bob"]
        assert dataset.split_dir == base
        assert {dataset[i]["identity"] for i in range(2)} == {0, 1}
    # clips directly under root: the cache goes to the user cache, not into root
    assert not (tmp_path / "b" / ".framefolder-train.json").exists()


def forbid_listing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("folder listed although the cache is fresh")
    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(os, "listdir", refuse)


def test_cache_written_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_vox(tmp_path / "vox")
    first = build(root)
    cache = root / ".framefolder-train.json"
    index = json.loads(cache.read_text())
    assert [c[0] for c in index["clips"]] == sorted(VOX_CLIPS)
    with monkeypatch.context() as patch:
        forbid_listing(patch)
        cached = build(root)
    assert cached.clips == first.clips
    time.sleep(0.05)  # past the file system's timestamp tick
    add_clip(root / "train", "idC#yt5#000000#000010.mp4", 2, 4)
    grown = build(root)
    assert len(grown) == 4 and grown.identities == ["idA", "idB", "idC"]
    assert len(json.loads(cache.read_text())["clips"]) == 5
    time.sleep(0.05)
    Image.new("RGB", (8, 8)).save(root / "train" / "idB#yt4#000005#000025.mp4" / "0000009.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        longer = FrameFolder(root, size=8)
    # the short clip now has 2 frames: usable, and no warning any more
    assert len(longer) == 5 and not [w for w in record if "skipped" in str(w.message)]
    index_now = json.loads(cache.read_text())["clips"]
    for damage in ("{not json", '{"version": 1, "clips": 3}', "[]"):
        cache.write_text(damage)  # a damaged cache is rebuilt, with a warning naming it
        with pytest.warns(UserWarning, match="framefolder-train.json: damaged frame index"):
            assert len(FrameFolder(root, size=8)) == 5
        assert json.loads(cache.read_text())["clips"] == index_now


def test_a_damaged_cache_is_rebuilt_in_a_real_process(tmp_path):
    root = make_vox(tmp_path / "vox")
    first = build(root)
    cache = root / ".framefolder-train.json"
    cache.write_bytes(cache.read_bytes()[:40])  # cut short, as by a full disk
    code = (f"from training.datasets import FrameFolder; "
            f"print(len(FrameFolder({str(root)!r}, size=8)))")
    done = subprocess.run([sys.executable, "-c", code], text=True,
                          capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
    assert done.returncode == 0 and done.stdout == "3\n", done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if "damaged frame index" in line]
    assert len(said) == 1 and f"{cache}: damaged frame index cache" in said[0], done.stderr
    assert [c[0] for c in json.loads(cache.read_text())["clips"]] == sorted(VOX_CLIPS)
    assert build(root).clips == first.clips


def test_cache_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    root = make_vox(tmp_path / "vox")
    (root / ".framefolder-train.json").mkdir()  # the cache path cannot be written as a file
    first = build(root)
    fallback = list((tmp_path / "xdg-cache" / "difffae").glob("framefolder-*-train.json"))
    assert len(fallback) == 1
    with monkeypatch.context() as patch:
        forbid_listing(patch)
        assert build(root).clips == first.clips


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="root not found") as caught:
        FrameFolder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value)
    root = make_vox(tmp_path / "vox")
    with pytest.raises(ValueError, match="split folder not found"):
        FrameFolder(root, split="test")
    add_clip(tmp_path / "short" / "train", "only", 1, 0)
    with pytest.raises(ValueError, match="no clip folder has >= 2 frames"):
        FrameFolder(tmp_path / "short")
    for kwargs in ({"seed": -1}, {"draws": 0}, {"size": 4},
                   {"split": "../x"}):
        with pytest.raises(ValueError):
            FrameFolder(root, **kwargs)
