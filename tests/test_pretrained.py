"""Tests for pretrained/: DECA's coarse encoder and ArcFace's iResNet-100 loaded from files in
their published layouts. The files are written here from the tests' own networks (forward
functions over state dicts with the published names and shapes, random weights), and FLAME 2020,
DECA's UVs and the BFM albedo space from the built-in head in those files' formats."""
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

import train
from assets.flame_files import FlameModelError, load_bfm_albedo
from assets.head import builtin_head
from difffae import render_face
from estimator import load_arcface, load_deca
from flame import FLAME, pose6_to_flame15
from pretrained import WeightsError
from pretrained.arcface import ArcFaceIdentity
from pretrained.deca import DecaEstimator, load_deca_flame
from render import SH_C0, Renderer
from runtime.checkpoint import load_model
from training import stages
from training.config import ConfigError, build_chain, build_configs

ROOT = Path(__file__).resolve().parents[1]
RESNET50 = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # width, blocks, first stride
IRESNET100 = ((64, 3), (128, 13), (256, 30), (512, 3))  # width, blocks; each starts at stride 2
DECA_SIZES = {"shape": 100, "albedo": 50, "expression": 50, "pose": 6, "cam": 3, "light": 27}
SIZE = 64  # render side


# -- The published layouts, from networks written here ---------------------------------------

def add_conv(state, name, out_channels, in_channels, kernel, gen):
    fan_in = in_channels * kernel * kernel
    state[name] = torch.randn(out_channels, in_channels, kernel, kernel,
                              generator=gen) * (2 / fan_in) ** 0.5


def add_norm(state, name, n, gen, gain=1.0):
    """A BatchNorm's entries with running statistics that are not the identity."""
    state[name + "weight"] = gain * (1 + 0.1 * torch.randn(n, generator=gen))
    state[name + "bias"] = 0.1 * torch.randn(n, generator=gen)
    state[name + "running_mean"] = 0.1 * torch.randn(n, generator=gen)
    state[name + "running_var"] = 1 + 0.5 * torch.rand(n, generator=gen)
    state[name + "num_batches_tracked"] = torch.tensor(1000)


def norm(x, state, name):
    return F.batch_norm(x, state[name + "running_mean"], state[name + "running_var"],
                        state[name + "weight"], state[name + "bias"], training=False, eps=1e-5)


def e_flame_state(gen):
    """DECA's E_flame: torchvision's ResNet-50 names under encoder. (no fc), the MLP under
    layers.0 and layers.2."""
    state = {}
    add_conv(state, "encoder.conv1.weight", 64, 3, 7, gen)
    add_norm(state, "encoder.bn1.", 64, gen)
    width = 64
    for i, (planes, blocks, _) in enumerate(RESNET50, 1):
        for j in range(blocks):
            name = f"encoder.layer{i}.{j}."
            add_conv(state, name + "conv1.weight", planes, width, 1, gen)
            add_norm(state, name + "bn1.", planes, gen)
            add_conv(state, name + "conv2.weight", planes, planes, 3, gen)
            add_norm(state, name + "bn2.", planes, gen)
            add_conv(state, name + "conv3.weight", 4 * planes, planes, 1, gen)
            add_norm(state, name + "bn3.", 4 * planes, gen, gain=0.3)
            if j == 0:
                add_conv(state, name + "downsample.0.weight", 4 * planes, width, 1, gen)
                add_norm(state, name + "downsample.1.", 4 * planes, gen)
            width = 4 * planes
    state["layers.0.weight"] = torch.randn(1024, 2048, generator=gen) / 2048 ** 0.5
    state["layers.0.bias"] = 0.1 * torch.randn(1024, generator=gen)
    state["layers.2.weight"] = torch.randn(236, 1024, generator=gen) / 1024 ** 0.5
    state["layers.2.bias"] = 0.1 * torch.randn(236, generator=gen)
    return state


def reference_resnet50(state, x):
    """DECA's encoder written out over its state dict: (B, 3, S, S) -> (B, 2048)."""
    x = F.relu(norm(F.conv2d(x, state["encoder.conv1.weight"], stride=2, padding=3), state,
                    "encoder.bn1."))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for i, (_, blocks, first_stride) in enumerate(RESNET50, 1):
        for j in range(blocks):
            name, stride = f"encoder.layer{i}.{j}.", first_stride if j == 0 else 1
            h = F.relu(norm(F.conv2d(x, state[name + "conv1.weight"]), state, name + "bn1."))
            h = F.conv2d(h, state[name + "conv2.weight"], stride=stride, padding=1)
            h = norm(F.conv2d(F.relu(norm(h, state, name + "bn2.")), state[name + "conv3.weight"]),
                     state, name + "bn3.")
            if j == 0:
                x = norm(F.conv2d(x, state[name + "downsample.0.weight"], stride=stride), state,
                         name + "downsample.1.")
            x = F.relu(h + x)
    return x.mean(dim=(2, 3))  # DECA's AvgPool2d(7) at 224 px


def reference_deca(state, images):
    """DECA's E_flame on images in [-1, 1] resized to its 224-px crop: (B, 236)."""
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False,
                      antialias=True)
    features = reference_resnet50(state, (x + 1) / 2)
    hidden = F.relu(F.linear(features, state["layers.0.weight"], state["layers.0.bias"]))
    return F.linear(hidden, state["layers.2.weight"], state["layers.2.bias"])


def iresnet100_state(gen):
    """arcface_torch's iresnet100 backbone.pth: conv1, bn1, prelu, layer1-4 of IBasicBlocks,
    bn2, fc (25088 -> 512), features (BatchNorm1d)."""
    state = {}
    add_conv(state, "conv1.weight", 64, 3, 3, gen)
    add_norm(state, "bn1.", 64, gen)
    state["prelu.weight"] = 0.25 + 0.05 * torch.randn(64, generator=gen)
    width = 64
    for i, (channels, blocks) in enumerate(IRESNET100, 1):
        for j in range(blocks):
            name = f"layer{i}.{j}."
            add_norm(state, name + "bn1.", width, gen)
            add_conv(state, name + "conv1.weight", channels, width, 3, gen)
            add_norm(state, name + "bn2.", channels, gen)
            state[name + "prelu.weight"] = 0.25 + 0.05 * torch.randn(channels, generator=gen)
            add_conv(state, name + "conv2.weight", channels, channels, 3, gen)
            add_norm(state, name + "bn3.", channels, gen, gain=0.3)
            if j == 0:
                add_conv(state, name + "downsample.0.weight", channels, width, 1, gen)
                add_norm(state, name + "downsample.1.", channels, gen)
            width = channels
    add_norm(state, "bn2.", 512, gen)
    state["fc.weight"] = torch.randn(512, 512 * 7 * 7, generator=gen) / (512 * 49) ** 0.5
    state["fc.bias"] = 0.1 * torch.randn(512, generator=gen)
    add_norm(state, "features.", 512, gen)
    return state


def reference_arcface(state, images):
    """ArcFace's iResNet-100 written out over its state dict, on images in [-1, 1] resized to
    112 px: the L2-normalised embedding (B, 512)."""
    x = F.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False,
                      antialias=True)
    x = F.prelu(norm(F.conv2d(x, state["conv1.weight"], padding=1), state, "bn1."),
                state["prelu.weight"])
    for i, (_, blocks) in enumerate(IRESNET100, 1):
        for j in range(blocks):
            name, stride = f"layer{i}.{j}.", 2 if j == 0 else 1
            h = F.conv2d(norm(x, state, name + "bn1."), state[name + "conv1.weight"], padding=1)
            h = F.prelu(norm(h, state, name + "bn2."), state[name + "prelu.weight"])
            h = norm(F.conv2d(h, state[name + "conv2.weight"], stride=stride, padding=1), state,
                     name + "bn3.")
            if j == 0:
                x = norm(F.conv2d(x, state[name + "downsample.0.weight"], stride=stride), state,
                         name + "downsample.1.")
            x = h + x
    x = F.linear(norm(x, state, "bn2.").flatten(1), state["fc.weight"], state["fc.bias"])
    return F.normalize(norm(x, state, "features."), dim=1)


# -- DECA's data folder: FLAME 2020, head_template.obj, FLAME_albedo_from_BFM.npz ------------

def write_flame_2020(head, path):
    """The built-in head as FLAME 2020's generic_model.pkl: 300 shape then 100 expression
    directions, faces 'f' (uint32), a sparse J_regressor, a kintree_table."""
    n_shape = int(head["n_shape_basis"])
    shapedirs = np.zeros(head["shapedirs"].shape[:2] + (400,), np.float32)
    shapedirs[..., :n_shape] = head["shapedirs"][..., :n_shape]
    shapedirs[..., 300:300 + head["shapedirs"].shape[2] - n_shape] = head["shapedirs"][
        ..., n_shape:]
    kintree = np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32)
    payload = {"v_template": head["v_template"], "shapedirs": shapedirs,
               "posedirs": head["posedirs"], "weights": head["weights"],
               "J_regressor": scipy.sparse.csc_matrix(head["J_regressor"]),
               "f": head["faces"].astype(np.uint32), "kintree_table": kintree}
    path.write_bytes(pickle.dumps(payload, protocol=2))


def write_obj(head, path):
    """DECA's head_template.obj: vertices, one vt per face corner, `f v/vt` triangles."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in head["v_template"]]
    lines += [f"vt {u!r} {v!r}" for u, v in head["face_uvs"].reshape(-1, 2).tolist()]
    lines += [f"f {a + 1}/{3 * k + 1} {b + 1}/{3 * k + 2} {c + 1}/{3 * k + 3}"
              for k, (a, b, c) in enumerate(head["faces"].tolist())]
    path.write_text("\n".join(lines) + "\n")


def bfm_layout(texture):
    """An RGB texture (3, T, T), or directions (C, 3, T, T), in the file's layout: flattened
    (row, column, B/G/R), a column per direction: (T·T·3,) or (T·T·3, C)."""
    bgr = np.flip(texture, axis=-3)
    if texture.ndim == 3:
        return np.ascontiguousarray(bgr.transpose(1, 2, 0)).reshape(-1)
    return np.ascontiguousarray(bgr.transpose(2, 3, 1, 0)).reshape(-1, len(texture))


def write_bfm_albedo(head, path, n_pc=60):
    """The built-in head's albedo as FLAME_albedo_from_BFM.npz at 256 px: its 8 directions,
    then zeros, to n_pc > 50 columns."""
    dirs = bfm_layout(head["albedo_dirs"].astype(np.float32))  # (T·T·3, 8)
    pcs = np.concatenate([dirs, np.zeros((len(dirs), n_pc - dirs.shape[1]), np.float32)], 1)
    np.savez(path, MU=bfm_layout(head["albedo_mean"].astype(np.float32)), PC=pcs)


@pytest.fixture(scope="module")
def deca_file(tmp_path_factory):
    """DECA's data folder: deca_model.tar with random E_flame weights, and the files its
    coefficients need. Returns (path, the E_flame state)."""
    folder = tmp_path_factory.mktemp("deca")
    state = e_flame_state(torch.Generator().manual_seed(0))
    detail = {"encoder.conv1.weight": torch.zeros(64, 3, 7, 7)}  # the detail model, unused
    torch.save({"E_flame": state, "E_detail": detail, "D_detail": {"x": torch.zeros(1)}},
               folder / "deca_model.tar")
    head = builtin_head()
    write_flame_2020(head, folder / "generic_model.pkl")
    write_obj(head, folder / "head_template.obj")
    write_bfm_albedo(head, folder / "FLAME_albedo_from_BFM.npz")
    return folder / "deca_model.tar", state


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory):
    """arcface_torch's backbone.pth with random iresnet100 weights: (path, its state)."""
    path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
    state = iresnet100_state(torch.Generator().manual_seed(1))
    torch.save(state, path)
    return path, state


def load_fixed(load, file, cls):
    """(network, state) of `load` on `file` = (path, state), checked to be a fixed `cls`: every
    entry of the file a buffer, no parameters, nothing for a checkpoint, eval mode whatever
    train() asks."""
    path, state = file
    network = load(path)
    assert isinstance(network, cls)
    assert len(list(network.buffers())) == len(state) and not list(network.parameters())
    assert network.state_dict() == {} and not network.train().training
    return network, state


# -- DECA --------------------------------------------------------------------------------------

def test_deca_loads_strictly_fixed_and_matches_the_written_out_network(deca_file):
    deca, state = load_fixed(load_deca, deca_file, DecaEstimator)
    torch.manual_seed(2)
    small = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # the trunk on a small input, then the whole estimator
        assert torch.allclose(deca.encoder(small), reference_resnet50(state, small),
                              rtol=1e-4, atol=1e-5)
        images = torch.rand(1, 3, 40, 56) * 2 - 1  # any size: resized to 224
        vector = deca.encode(deca(images))  # (1, 236)
        assert torch.allclose(vector, reference_deca(state, images), rtol=1e-4, atol=1e-5)


def test_the_236_numbers_split_in_decas_order_and_light_is_9_by_3(deca_file):
    deca = load_deca(deca_file[0])
    deca.layers[2].weight.zero_()
    deca.layers[2].bias.copy_(torch.arange(236.0))
    out = deca(torch.zeros(1, 3, 8, 8))
    assert list(out) == list(DECA_SIZES)  # DECA: shape, tex, exp, pose, cam, light
    start = 0
    for key, size in DECA_SIZES.items():
        assert out[key].flatten().tolist() == list(range(start, start + size)), key
        start += size
    assert out["light"].shape == (1, 9, 3)
    assert out["light"][0, 4, 2] == 209 + 3 * 4 + 2  # light[k, rgb] = v[209 + 3k + rgb]


def test_known_coefficients_drive_flame_2020_with_the_bfm_albedo(deca_file):
    """A DECA file whose last layer is a constant reads known coefficients off any image; they
    drive FLAME 2020 (here the built-in head in its format) through render.py exactly as the
    head's own arrays do; the camera shifts the head right and up by s·t·W/2 pixels, and a DC
    light scales the albedo by c_0·l_0 per colour."""
    path = deca_file[0]
    gen = torch.Generator().manual_seed(3)
    vector = 0.3 * torch.randn(1, 236, generator=gen)
    vector[0, 200:206] = torch.tensor([0.1, 0.4, 0.05, 0.2, 0.0, 0.0])  # global, jaw
    vector[0, 206:209] = torch.tensor([7.0, 0.01, -0.02])  # s, tx, ty
    vector[0, 209:236] = 0.2 * torch.randn(27, generator=gen)
    vector[0, 209:212] = torch.tensor([3.0, 2.5, 2.0])  # the DC light per colour
    deca = load_deca(path)
    deca.layers[2].weight.zero_()
    deca.layers[2].bias.copy_(vector[0])
    coefficients = deca(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert torch.equal(deca.encode(coefficients), vector)
    flame = load_deca_flame(path)
    assert (flame.n_shape, flame.n_exp, flame.n_albedo) == (100, 50, 50)
    renderer = Renderer(flame.faces, flame.face_uvs, SIZE, cull_backfaces=True)
    image, mask = render_face(flame, renderer, coefficients)
    # the built-in head's own arrays take the coefficients of its 59 shape, 23 expression
    # and 8 albedo directions (the file's other directions are zero)
    head = FLAME().double()
    c = {key: value.double() for key, value in coefficients.items()}
    vertices = head(c["shape"][:, :head.n_shape], c["expression"][:, :head.n_exp],
                    pose6_to_flame15(c["pose"]))
    head_renderer = Renderer(head.faces, head.face_uvs, SIZE, cull_backfaces=True).double()
    out = head_renderer(vertices, head.albedo(c["albedo"][:, :head.n_albedo]), c["light"],
                        c["cam"])
    assert mask.sum() > 500
    assert (mask != out["mask"]).sum() <= 3  # float32 against float64 on the edges
    both = (mask * out["mask"]).bool().expand_as(image)
    assert (image - (out["image"] * 2 - 1))[both].abs().max() < 1e-3
    # DECA's camera through FLAME 2020: t moves the head by s·t·W/2 pixels, x right and y up
    # (a head of half the frame's size, so that no part of it leaves the frame)
    scale = 4.0
    shift = 4 / (scale * SIZE / 2)  # 4 pixels
    vertices = flame(coefficients["shape"], coefficients["expression"],
                     pose6_to_flame15(coefficients["pose"]))
    dc = torch.zeros_like(coefficients["light"])
    dc[:, 0] = coefficients["light"][:, 0]  # v[209:212]

    def centroid(cam):
        drawn = renderer(vertices, flame.albedo(coefficients["albedo"]), dc, torch.tensor([cam]))
        rows, cols = drawn["mask"][0, 0].nonzero(as_tuple=True)
        return torch.stack([cols.double().mean(), rows.double().mean()]), drawn

    before, drawn = centroid([scale, 0.0, 0.0])
    after, _ = centroid([scale, shift, shift])
    assert torch.allclose(after - before, torch.tensor([4.0, -4.0], dtype=torch.float64),
                          atol=0.01)
    # DECA's DC light, v[209:212]: image = albedo · c_0 · l_0 in each colour
    gain = SH_C0 * torch.tensor([3.0, 2.5, 2.0])[:, None, None]
    assert torch.allclose(drawn["image"][0], drawn["albedo_image"][0] * gain, atol=1e-6)


def test_bfm_albedo_layout_order_and_resize(tmp_path):
    """MU and PC flatten (row, column, B/G/R) textures; the first A columns are kept, the
    texture resized by nearest neighbour (texel i <- i·T'/T) and reordered to RGB."""
    side, n_pc = 4, 5
    rows, cols, bgr = np.meshgrid(np.arange(side), np.arange(side), np.arange(3), indexing="ij")
    code = 100 * rows + 10 * cols + bgr  # (T', T', 3)
    pcs = code.reshape(-1, 1) + 1000 * np.arange(n_pc)  # (T'·T'·3, n_pc)
    np.savez(tmp_path / "albedo.npz", MU=code.reshape(1, -1), PC=pcs.reshape(side, side, 3, -1))
    space = load_bfm_albedo(tmp_path / "albedo.npz", n_albedo=3, size=2)
    assert space["albedo_mean"].shape == (3, 2, 2) and space["albedo_dirs"].shape == (3, 3, 2, 2)
    for rgb in range(3):
        for i in range(2):
            for j in range(2):
                texel = 100 * 2 * i + 10 * 2 * j + (2 - rgb)
                assert space["albedo_mean"][rgb, i, j] == texel
                assert space["albedo_dirs"][:, rgb, i, j].tolist() == [texel, texel + 1000,
                                                                      texel + 2000]
    np.savez(tmp_path / "bad.npz", MU=np.zeros(10), PC=np.zeros((10, 3)))
    np.savez(tmp_path / "few.npz", MU=np.zeros(12), PC=np.zeros((12, 2)))
    for name, problem in (("missing.npz", "no such file"), ("bad.npz", "not a T × T × 3"),
                          ("few.npz", "2 albedo directions, 3 needed")):
        with pytest.raises(FlameModelError, match=problem):
            load_bfm_albedo(tmp_path / name, n_albedo=3, size=2)


# -- ArcFace -----------------------------------------------------------------------------------

def test_arcface_loads_strictly_fixed_and_matches_the_written_out_network(arcface_file):
    identity, state = load_fixed(load_arcface, arcface_file, ArcFaceIdentity)
    torch.manual_seed(4)
    images = torch.rand(1, 3, 48, 48) * 2 - 1  # any size: resized to 112
    with torch.no_grad():
        embedding = identity(images)
        assert embedding.shape == (1, 512)
        assert torch.allclose(embedding.norm(dim=1), torch.ones(1))
        assert torch.allclose(embedding, reference_arcface(state, images), atol=1e-5)


# -- Files that are not the network's: one line -----------------------------------------------

def test_a_file_that_is_not_the_networks_is_refused_in_one_line(deca_file, arcface_file,
                                                                tmp_path):
    (deca, e_flame), (arcface, _) = deca_file, arcface_file
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    refusals = [(load_deca, arcface, "no 'E_flame' entry, so not DECA's deca_model.tar"),
                (load_arcface, deca, "not a state dict of tensors, so not arcface_torch's"),
                (load_deca, junk, "not a readable PyTorch file"),
                (load_deca, tmp_path / "none.tar", "no such file")]
    edits = {"encoder.layer3.5.conv2.weight": (None, r"1 missing weights \(encoder.layer3.5"),
             "encoder.fc.weight": (torch.zeros(1000, 2048), r": 1 unexpected weights \(encoder.fc"),
             "layers.2.weight": (torch.zeros(200, 1024), r"'layers.2.weight' has shape "
                                 r"\(200, 1024\), expected \(236, 1024\)")}
    for n, (key, (value, problem)) in enumerate(edits.items()):
        edited = {k: v for k, v in e_flame.items() if k != key}
        if value is not None:
            edited[key] = value
        torch.save({"E_flame": edited}, tmp_path / f"edited{n}.tar")
        refusals.append((load_deca, tmp_path / f"edited{n}.tar", problem))
    for load, path, problem in refusals:
        with pytest.raises(WeightsError, match=problem) as error:
            load(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    # an older file without BatchNorm's counters loads all the same
    torch.save({"E_flame": {k: v for k, v in e_flame.items()
                            if not k.endswith("num_batches_tracked")}}, tmp_path / "old.tar")
    load_deca(tmp_path / "old.tar")


def test_train_py_refuses_them_in_one_line_before_any_work(deca_file, arcface_file, tmp_path,
                                                          capsys):
    (deca, _), (arcface, _) = deca_file, arcface_file
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "ldm",
                           f"--deca={arcface}", f"--data={tmp_path}", f"--out={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (f"error: {arcface}: no 'E_flame' entry, so not DECA's "
                           f"deca_model.tar (its entries: conv1.weight, bn1.weight, "
                           f"bn1.bias, ...)\n")
    for options, problem in (([f"--arcface={deca}"], f"error: {deca}: not a state dict"),
                             ([f"--deca={deca}"], "error: --deca: DECA's coefficients drive"),
                             ([f"--deca={deca.parent / 'none.tar'}", f"--data={tmp_path}"],
                              "error: " + str(deca.parent / "none.tar") + ": no such file")):
        with pytest.raises(SystemExit) as stop:
            train.main(["--stage", "ldm", *options, f"--out={tmp_path}"])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and error.startswith(problem) and error.count("\n") == 1
    assert not (tmp_path / "ldm").exists()  # refused before the stage began


# -- The training stages ------------------------------------------------------------------------

def test_stage_all_leaves_out_the_stages_they_replace():
    chain = build_chain(["--stage", "all", "--preset", "paper", "--deca=d.tar",
                         "--arcface=b.pth"])
    assert [cfg.stage for cfg, _ in chain] == ["vqvae", "slots", "ldm"]
    assert chain[-1][0].deca == "d.tar" and chain[-1][0].arcface == "b.pth"
    assert [cfg.stage for cfg, _ in build_chain(["--stage", "all", "--arcface=b.pth"])] == [
        "vqvae", "slots", "estimator", "ldm"]
    with pytest.raises(ConfigError, match="--deca=d.tar: unknown key for the estimator stage"):
        build_configs(["--stage", "estimator", "--deca=d.tar"])
    # a resumed run may not change which networks it was trained with; it may move their files
    saved, path = {"train": {"deca": "", "arcface": "b.pth"}}, Path("runs/ldm/ckpt.pt")
    with pytest.raises(ConfigError, match="--deca=d.tar: runs/ldm/ckpt.pt was trained with"):
        train.check_resume({"train": {"deca": "d.tar", "arcface": "b.pth"}}, saved, path, False)
    train.check_resume({"train": {"deca": "", "arcface": "moved/b.pth"}}, saved, path, False)


def test_the_ldm_stage_takes_them_fixed_and_checkpoints_leave_them_out(deca_file, arcface_file,
                                                                      tmp_path):
    (deca, _), (arcface, _) = deca_file, arcface_file
    stages.write_random_parts(tmp_path, ["--smoke=true"])
    for replaced in ("estimator", "identity"):  # their stages need not have run
        (tmp_path / replaced / "ckpt.pt").unlink()
    options = ["--stage", "ldm", "--smoke=true", f"--data={tmp_path}", f"--deca={deca}",
               f"--arcface={arcface}", "--diffusion.truth_fraction=0",
               "--diffusion.slots_supervision=0", f"--out={tmp_path}"]
    cfg, parts = build_configs(options)
    stages.require_earlier_checkpoints(cfg)
    torch.manual_seed(0)
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
    model = stage.model
    assert isinstance(model.estimator, DecaEstimator)
    assert isinstance(model.identity, ArcFaceIdentity) and model.flame.n_shape == 100
    kept = {name.split(".")[1] for name in stage.state_dict()}
    assert {"vqvae", "slots", "unet"} <= kept and not kept & {"estimator", "identity", "flame"}
    stage.train()
    assert not model.estimator.training and not model.identity.training
    # a training step goes through them: DECA's reading drives FLAME 2020, ArcFace gives f_id
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"source": images[:1], "query": images[1:]}
    with torch.no_grad():
        reading = model.estimator(batch["query"])
        assert reading["light"].shape == (1, 9, 3) and reading["albedo"].shape == (1, 50)
        assert model.render(reading)[0].shape == (1, 3, 32, 32)
    model.set_latent_scale(batch["query"])
    losses = stage(batch, 0)
    assert torch.isfinite(losses["loss"])
    # the checkpoint names the files; loading it loads them again
    config = {"train": dataclasses.asdict(cfg),
              **{name: dataclasses.asdict(c) for name, c in parts.items()}}
    torch.save({"stage": "ldm", "step": 1, "model": stage.state_dict(), "config": config},
               tmp_path / "ldm.pt")
    loaded = load_model(tmp_path / "ldm.pt")
    assert isinstance(loaded.estimator, DecaEstimator) and loaded.flame.n_exp == 50
    assert isinstance(loaded.identity, ArcFaceIdentity)
