"""Synthetic portraits: determinism, regions, ground truth, and the export / preview commands."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tools import drive
from assets import synthetic
from runtime.images import load_image
from training.datasets import FrameFolder
from layers import BACKGROUND, CLOTHES, FACE, HAIR
from assets.synthetic import SyntheticPortraits


@pytest.fixture(scope="module")
def train():
    return SyntheticPortraits(48, "train", length=64)


@pytest.fixture(scope="module")
def cross_pairs():
    return SyntheticPortraits(48, "test", length=8)


def test_items_are_deterministic_and_independent_of_batching(train):
    other = SyntheticPortraits(48, "train", length=64)
    batch = train.__getitems__([3, 4, 5])
    single = other[4]
    assert torch.allclose(batch[1]["source"], single["source"], atol=1e-4)
    assert torch.equal(batch[1]["query_regions"], single["query_regions"])
    for key in synthetic.PARAM_KEYS:
        assert torch.equal(batch[1]["query_params"][key], single["query_params"][key])
    assert not torch.equal(batch[0]["source"], batch[1]["source"])
    reseeded = SyntheticPortraits(48, "train", seed=1, length=64)[4]
    assert not torch.allclose(reseeded["source"], single["source"])


def test_shapes_ranges_and_parameters(train):
    item = train[0]
    for key in ("source", "query"):
        assert item[key].shape == (3, 48, 48) and item[key].dtype == torch.float32
        assert item[key].min() >= -1 and item[key].max() <= 1
        assert item[f"{key}_regions"].shape == (48, 48)
        assert item[f"{key}_regions"].dtype == torch.long
    flame = train.renderer.flame
    params = item["source_params"]
    expected = {"shape": (flame.n_shape,), "expression": (flame.n_exp,), "pose": (15,),
                "pose6": (6,), "albedo": (flame.n_albedo,), "light": (9, 3), "cam": (3,)}
    assert {key: tuple(value.shape) for key, value in params.items()} == expected
    # DECA's pose6 is FLAME's global and jaw rotations
    assert torch.equal(params["pose6"], torch.cat([params["pose"][:3], params["pose"][6:9]]))
    assert isinstance(item["identity"], int)


def test_regions_are_substantial_and_the_face_dominates(train):
    items = train.__getitems__(range(32))
    regions = torch.stack([item[key] for item in items for key in ("source_regions",
                                                                    "query_regions")])
    fractions = torch.stack([(regions == k).float().mean() for k in range(4)])
    assert (fractions > 0.03).all(), fractions
    assert fractions[FACE] > max(fractions[HAIR], fractions[CLOTHES]), fractions
    present = torch.stack([(regions == k).flatten(1).any(1) for k in range(4)], 1)
    assert present[:, [BACKGROUND, FACE, CLOTHES]].all()
    assert present[:, HAIR].float().mean() > 0.9


def test_source_and_query_share_the_person_and_backdrop_but_not_the_frame(train):
    for item in train.__getitems__(range(4)):
        both = (item["source_regions"] == BACKGROUND) & (item["query_regions"] == BACKGROUND)
        assert both.sum() > 100
        assert torch.allclose(item["source"][:, both], item["query"][:, both])
        s, q = item["source_params"], item["query_params"]
        assert torch.equal(s["shape"], q["shape"]) and torch.equal(s["albedo"], q["albedo"])
        assert not torch.equal(s["pose"], q["pose"])
        assert not torch.equal(item["source_regions"], item["query_regions"])


def test_test_split_is_cross_identity_with_the_exact_target(cross_pairs, train):
    item = cross_pairs[2]
    a, b = item["identity"], item["query_identity"]
    assert a != b and min(a, b) >= synthetic.TEST_ID_OFFSET
    train_ids = {train.identity_ids(i)[0] for i in range(len(train))}
    assert max(train_ids) < synthetic.TEST_ID_OFFSET
    # the target is identity A re-rendered with B's frame
    images, regions = cross_pairs.render([cross_pairs.identity(a)], [cross_pairs.frame(2, 1)])
    assert torch.allclose(item["target"], images[0], atol=1e-4)  # batch-size rounding only
    assert torch.equal(item["target_regions"], regions[0])
    assert torch.equal(item["query_params"]["pose"], torch.as_tensor(
        cross_pairs.frame(2, 1)["pose"], dtype=torch.float32))
    assert not torch.equal(item["source_params"]["shape"], item["query_params"]["shape"])


def test_hair_is_geometry_that_turns_with_the_head(train):
    identity = train.identity(7)
    frame = train.frame(7, 0)
    frames = []
    for yaw in (-0.6, 0.6):
        f = {key: value.copy() for key, value in frame.items()}
        f["pose"][:3] = [0.0, yaw, 0.0]
        frames.append(f)
    _, regions = train.render([identity, identity], frames)
    cols = torch.arange(48, dtype=torch.float32)
    face_x = [cols[(r == FACE).nonzero()[:, 1]].mean() for r in regions]
    hair_x = [cols[(r == HAIR).nonzero()[:, 1]].mean() for r in regions]
    # turning to the subject's left (+x, image right) moves the face right and the hair behind it
    # to the left; the hair's occlusion of the head changes
    assert face_x[1] > face_x[0] + 1 and hair_x[1] < hair_x[0] - 1
    assert not torch.equal(regions[0] == HAIR, regions[1].flip(1) == HAIR)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticPortraits(32, "val")
    with pytest.raises(ValueError, match="size"):
        SyntheticPortraits(4)
    with pytest.raises(IndexError):
        SyntheticPortraits(32, length=2)[2]


def test_export_round_trips_through_frame_folder(tmp_path):
    clips = synthetic.export_synthetic(tmp_path, 3, 32, "train", seed=0)
    dataset = SyntheticPortraits(32, "train", length=3)
    folder = FrameFolder(tmp_path, "train", size=32)
    assert len(folder) == 3 and len(clips) == 3
    for index, clip in enumerate(sorted(clips)):
        item = dataset[index]
        assert torch.allclose(load_image(clip / "0000000.png", 32), item["source"], atol=1 / 127)
        assert torch.allclose(load_image(clip / "0000001.png", 32), item["query"], atol=1 / 127)
        params = json.loads((clip / "params.json").read_text())
        assert np.allclose(params["query"]["pose"], item["query_params"]["pose"].numpy())
    assert folder.identities == sorted(f"id{dataset[i]['identity']:07d}" for i in range(3))


def test_command_line(tmp_path):
    out = tmp_path / "preview.png"
    done = subprocess.run([sys.executable, "-m", "assets.synthetic", "--preview", str(out),
                           "--size", "32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load_image(out, 32).shape == (3, 32, 32)
    bad = subprocess.run([sys.executable, "-m", "assets.synthetic", "--export", str(tmp_path),
                          "--n", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --n 0")


def test_a_clip_eases_through_its_keyframes_with_the_source_person_as_target(cross_pairs,
                                                                            tmp_path):
    clip = cross_pairs.clip(1, 5)
    n_exp = cross_pairs.renderer.flame.n_exp
    rng = synthetic._rng(cross_pairs.seed, synthetic.CLIP_CODE, 1)
    keys = [synthetic.sample_frame(rng, n_exp) for _ in range(synthetic.CLIP_KEYFRAMES)]
    frames = clip["frames"]
    # 5 frames through 3 keyframes: frames 0, 2, 4 are keyframes; 1 and 3 halfway (s(½) = ½)
    for key in ("pose", "expression", "light"):
        for k, a in ((0, 0), (2, 1), (4, 2)):
            assert np.allclose(frames[k][key], keys[a][key], atol=1e-12), (key, k)
        assert np.allclose(frames[1][key], (keys[0][key] + keys[1][key]) / 2, atol=1e-12), key
    assert all(np.array_equal(frame["cam"], keys[0]["cam"]) for frame in frames)
    # the target is the source person (A) in each frame, the query person B in the same frames
    a, b = (cross_pairs.identity(person) for person in cross_pairs.identity_ids(1))
    images, regions = cross_pairs.render([a, b, a], [frames[3], frames[3], cross_pairs.frame(1, 0)])
    for image, key in ((0, "target"), (1, "query")):
        torch.testing.assert_close(clip[key][3], images[image], atol=1e-4, rtol=0)
    assert torch.equal(clip["target_regions"][3], regions[0])
    torch.testing.assert_close(clip["source"], images[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(clip["source"], cross_pairs[1]["source"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="test split"):
        SyntheticPortraits(32, "train", length=2).clip(0, 3)
    # the export: the frames as read back by drive.read_clip, and their coefficients
    synthetic.export_clip(tmp_path, 5, 48, index=1)
    for key in ("query", "target"):
        read = drive.read_clip(tmp_path / key, 48)
        torch.testing.assert_close(read, clip[key], atol=1 / 127, rtol=0)
    params = json.loads((tmp_path / "params.json").read_text())
    assert len(params["query"]) == len(params["target"]) == 5
    assert np.allclose(params["target"][3]["pose"], frames[3]["pose"], atol=1e-6)
    assert np.allclose(params["target"][3]["shape"], a["shape"], atol=1e-6)
    assert np.allclose(params["query"][3]["shape"], b["shape"], atol=1e-6)


def test_a_pool_cut_short_goes_on_from_its_last_chunk(tmp_path, monkeypatch):
    """Ctrl-C while the pool renders: the chunks done are kept, a rerun renders only the rest,
    and the pool is the one an uninterrupted rendering makes; the kept chunks then go."""
    args = (16, 70, 4, 0)  # size, pairs, identities, seed: two chunks, of 64 and of 6 pairs
    whole = synthetic.render_pool(tmp_path / "whole.pt", *args)
    rendered, render = [], synthetic._render_chunk

    def cut_after_one(task):
        if rendered:
            raise KeyboardInterrupt
        rendered.append(task[-1])
        return render(task)

    monkeypatch.setattr(synthetic, "_render_chunk", cut_after_one)
    with pytest.raises(KeyboardInterrupt):
        synthetic.render_pool(tmp_path / "cut.pt", *args)
    assert not (tmp_path / "cut.pt").exists() and rendered == [0]
    monkeypatch.setattr(synthetic, "_render_chunk", lambda task: rendered.append(task[-1])
                        or render(task))
    pool = synthetic.render_pool(tmp_path / "cut.pt", *args)
    assert rendered == [0, synthetic.POOL_CHUNK]  # the second run rendered the second alone
    assert pool.keys() == whole.keys() and all(torch.equal(pool[k], whole[k]) for k in pool)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt", "whole.pt"]
