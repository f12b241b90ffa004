"""FLAME loader, linear blend skinning and the built-in head, against analytic references."""
import os
import pickle
import sys
import time
import types

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.spatial.transform import Rotation

from assets import head
from assets import head_surface
from assets.flame_files import FlameModelError, load_flame, load_obj_uvs, save_npz
from flame import FLAME, rodrigues


def random_model(n_vertices=30, n_dirs=6, seed=0):
    """A small random model in FLAME's layout (5 joints, FLAME's kinematic tree)."""
    rng = np.random.default_rng(seed)
    weights = rng.random((n_vertices, 5)) ** 3
    regressor = rng.random((5, n_vertices))
    return {
        "v_template": rng.normal(size=(n_vertices, 3)),
        "shapedirs": rng.normal(size=(n_vertices, 3, n_dirs)) * 0.1,
        "posedirs": rng.normal(size=(n_vertices, 3, 36)) * 0.1,
        "J_regressor": regressor / regressor.sum(1, keepdims=True),
        "weights": weights / weights.sum(1, keepdims=True),
        "parents": np.array([-1, 0, 1, 1, 1]),
        "faces": rng.integers(0, n_vertices, size=(10, 3)),
        "n_shape_basis": np.array(4),
    }


def reference_lbs(model, shape, expression, pose):
    """Per-vertex loop implementation of FLAME's skinning with scipy rotations (one item)."""
    basis = int(model["n_shape_basis"])
    coeffs = np.concatenate([shape, expression])
    dirs = np.concatenate([model["shapedirs"][..., :len(shape)],
                           model["shapedirs"][..., basis:basis + len(expression)]], 2)
    v_shaped = model["v_template"] + dirs @ coeffs
    joints = model["J_regressor"] @ v_shaped
    rots = [Rotation.from_rotvec(pose[3 * j:3 * j + 3]).as_matrix() for j in range(5)]
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rots[1:]])
    v_posed = v_shaped + model["posedirs"] @ feature
    world = []
    for j, parent in enumerate(model["parents"]):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
        world.append(local if parent < 0 else world[parent] @ local)
    out = np.zeros_like(v_posed)
    for v in range(len(v_posed)):
        for j in range(5):
            moved = world[j][:3, :3] @ (v_posed[v] - joints[j]) + world[j][:3, 3]
            out[v] += model["weights"][v, j] * moved
    return out


def test_rodrigues_matches_scipy_and_is_a_rotation():
    axis_angle = torch.randn(64, 3, dtype=torch.float64) * 2
    R = rodrigues(axis_angle)
    expected = Rotation.from_rotvec(axis_angle.numpy()).as_matrix()
    assert np.allclose(R.numpy(), expected, atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(-1, -2), eye.expand(64, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(64, dtype=torch.float64))


def test_rodrigues_is_smooth_at_zero():
    tiny = torch.tensor([[1e-9, -2e-9, 3e-9], [0.0, 0.0, 0.0]], dtype=torch.float64,
                        requires_grad=True)
    R = rodrigues(tiny)
    R.sum().backward()
    assert torch.isfinite(tiny.grad).all()
    # dR/dω at 0 is the cross-product generator: d(sum R)/dω = (0, 0, 0) by antisymmetry
    assert torch.allclose(tiny.grad, torch.zeros_like(tiny.grad), atol=1e-8)
    assert torch.autograd.gradcheck(rodrigues, (torch.randn(4, 3, dtype=torch.float64,
                                                            requires_grad=True),))


def test_lbs_matches_a_per_vertex_reference():
    model = random_model()
    flame = FLAME(model, n_shape=3, n_exp=2).double()
    rng = np.random.default_rng(1)
    shape, exp, pose = rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), rng.normal(size=(2, 15))
    out = flame(torch.tensor(shape), torch.tensor(exp), torch.tensor(pose)).numpy()
    for b in range(2):
        assert np.allclose(out[b], reference_lbs(model, shape[b], exp[b], pose[b]), atol=1e-10)


def test_zero_parameters_give_the_template():
    flame = FLAME().double()
    zeros = torch.zeros(2, flame.n_shape, dtype=torch.float64)
    out = flame(zeros, torch.zeros(2, flame.n_exp, dtype=torch.float64),
                torch.zeros(2, 15, dtype=torch.float64))
    assert torch.allclose(out, flame.v_template.expand_as(out), atol=1e-12)


def test_global_rotation_is_rigid_about_the_root_joint():
    flame = FLAME().double()
    shape = torch.randn(1, flame.n_shape, dtype=torch.float64)
    exp = torch.randn(1, flame.n_exp, dtype=torch.float64)
    rest = flame(shape, exp, torch.zeros(1, 15, dtype=torch.float64))
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, :3] = torch.tensor([0.3, -0.5, 0.2])
    posed = flame(shape, exp, pose)
    v_shaped = flame.v_template + torch.einsum("vck,k->vc", flame.blenddirs,
                                               torch.cat([shape[0], exp[0]]))
    root = flame.J_regressor[0] @ v_shaped
    R = rodrigues(pose[0, :3])
    # weights are stored in float32, so they sum to 1 only to ~1e-7
    assert torch.allclose(posed[0], (rest[0] - root) @ R.T + root, atol=1e-7)


def test_jaw_rotation_moves_only_jaw_weighted_vertices():
    flame = FLAME().double()
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 6] = 0.35
    zeros_s = torch.zeros(1, flame.n_shape, dtype=torch.float64)
    zeros_e = torch.zeros(1, flame.n_exp, dtype=torch.float64)
    moved = (flame(zeros_s, zeros_e, pose)[0] - flame.v_template).norm(dim=1)
    jaw = flame.weights[:, 2]
    assert moved[jaw == 0].max() < 1e-7  # float32 weights: exact up to rounding
    assert moved[jaw > 0.99].min() > 1e-3
    # the mouth opens: the lower lip's outer edge drops well away from the upper lip's
    rows, groove = head_surface.theta_rows()
    cols = head.skin_grid()[1]
    middle = int(np.argmin(np.abs(cols)))
    upper, lower = (1 + (groove[k] - 1) * len(cols) + middle for k in (0, -1))
    opened = flame(zeros_s, zeros_e, pose)[0]
    closed_gap = (flame.v_template[upper] - flame.v_template[lower]).norm()
    open_gap = (opened[upper] - opened[lower]).norm()
    assert closed_gap < 0.003 and open_gap > closed_gap + 0.015


def test_eye_pose_rotates_each_eyeball_about_its_joint():
    flame = FLAME().double()
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 9:12] = torch.tensor([0.0, 0.4, 0.0])  # left eye looks to the subject's left
    zs, ze = torch.zeros(1, flame.n_shape, dtype=torch.float64), torch.zeros(1, flame.n_exp,
                                                                           dtype=torch.float64)
    out = flame(zs, ze, pose)[0]
    left = flame.weights[:, 3] == 1
    centre = flame.J_regressor[3] @ flame.v_template
    R = rodrigues(pose[0, 9:12])
    expected = (flame.v_template[left] - centre) @ R.T + centre
    assert torch.allclose(out[left], expected, atol=1e-12)
    assert torch.allclose(out[~left], flame.v_template[~left], atol=1e-12)
    # the eyeball is a sphere centred on its joint, so turning it keeps it in its socket
    radius = (flame.v_template[left] - centre).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, head_surface.EYEBALL_RADIUS), atol=1e-9)


def test_builtin_head_is_a_closed_consistently_oriented_mesh():
    model = head.builtin_head()
    faces = model["faces"]
    assert 1000 <= len(model["v_template"]) <= 20000
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    directed = {tuple(e) for e in edges.tolist()}
    assert len(directed) == len(edges), "a directed edge appears twice: inconsistent winding"
    assert all((b, a) in directed for a, b in directed), "an edge has one face: not closed"
    v = model["v_template"]
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6
    assert volume > 0, "normals point inward"
    # three closed components: skin and two eyeballs; every vertex used
    assert len(np.unique(faces)) == len(v)


def test_builtin_head_layout_and_axes():
    model = head.builtin_head()
    flame = FLAME()
    assert int(model["n_shape_basis"]) >= 50 and flame.n_shape >= 50
    assert model["shapedirs"].shape[2] - int(model["n_shape_basis"]) >= 20
    assert flame.n_exp == len(head.EXPRESSION_NAMES)
    v = model["v_template"]
    # FLAME's axes: y up (crown above chin), the face looks along +z (nose tip most forward)
    nose = np.argmax(v[:, 2])
    assert abs(v[nose, 0]) < 1e-3 and -0.06 < v[nose, 1] < 0.03
    assert v[:, 1].max() > 0.1 and 0.2 < np.ptp(v[:, 1]) < 0.4
    assert np.allclose(model["weights"].sum(1), 1) and (model["weights"] >= 0).all()
    assert np.allclose(model["J_regressor"].sum(1), 1)
    joints = model["J_regressor"] @ v
    assert np.allclose(joints[:3, 0], 0, atol=1e-9), "global, neck and jaw on the midplane"
    assert np.allclose(joints[3], joints[4] * [-1, 1, 1]), "the eyes mirror each other"
    assert joints[3, 0] > 0  # the left eye at +x
    assert model["face_uvs"].shape == (len(model["faces"]), 3, 2)
    assert model["face_uvs"].min() >= 0 and model["face_uvs"].max() <= 1


def test_builtin_head_is_deterministic_and_fast():
    head._build.cache_clear()
    start = time.perf_counter()
    first = head.builtin_head()
    assert time.perf_counter() - start < 1.5
    second = head.builtin_head()
    first["v_template"][:] = 0  # copies: callers cannot corrupt the cache
    third = head.builtin_head()
    for key in second:
        assert np.array_equal(second[key], third[key]), key


def test_shape_directions_change_proportions_plausibly():
    flame = FLAME().double()
    zero_e = torch.zeros(1, flame.n_exp, dtype=torch.float64)
    width = torch.zeros(1, flame.n_shape, dtype=torch.float64)
    width[0, 0] = 2.0  # head width
    wide = flame(width, zero_e, torch.zeros(1, 15, dtype=torch.float64))[0]
    assert np.ptp(wide[:, 0].numpy()) > np.ptp(flame.v_template[:, 0].numpy()) * 1.04
    gen = torch.Generator().manual_seed(0)
    shapes = torch.randn(64, flame.n_shape, generator=gen, dtype=torch.float64)
    out = flame(shapes, zero_e.expand(64, -1), torch.zeros(64, 15, dtype=torch.float64))
    offset = (out - flame.v_template).norm(dim=-1)  # (64, V)
    # like FLAME's population: about a centimetre RMS at one standard deviation, a few cm at most
    assert 0.004 < offset.pow(2).mean().sqrt() < 0.012
    assert offset.max() < 0.04


def test_expression_directions_are_local_and_visible():
    flame = FLAME().double()
    model = head.builtin_head()
    dirs = model["shapedirs"][..., int(model["n_shape_basis"]):]  # (V, 3, E)
    size = np.linalg.norm(dirs, axis=1).max(0)
    assert (size > 0.003).all(), "every expression moves some skin by at least 3 mm"
    eyes_closed = head.EXPRESSION_NAMES.index("eyes_closed")
    moved = np.linalg.norm(dirs[:, :, eyes_closed], axis=1) > 1e-4
    joints = model["J_regressor"] @ model["v_template"]
    near_eyes = np.minimum(*(np.linalg.norm(model["v_template"] - joints[j], axis=1)
                             for j in (3, 4)))
    assert near_eyes[moved].max() < 0.04, "closing the eyes moves only skin around the eyes"


def test_albedo_space():
    flame = FLAME()
    coeffs = torch.randn(3, flame.n_albedo) * 3
    tex = flame.albedo(coeffs)
    assert tex.shape == (3, 3, head.TEXTURE_SIZE, head.TEXTURE_SIZE)
    assert tex.min() >= 0 and tex.max() <= 1
    mean = flame.albedo(torch.zeros(1, flame.n_albedo))[0]
    assert torch.allclose(mean, flame.albedo_mean.clamp(0, 1))
    with pytest.raises(AssertionError, match="albedo coefficients"):
        flame.albedo(torch.zeros(1, flame.n_albedo + 1))


def test_forward_asserts_shapes_and_supports_float32_and_batches():
    flame = FLAME()
    with pytest.raises(AssertionError):
        flame(torch.zeros(2, flame.n_shape), torch.zeros(2, 3), torch.zeros(2, 15))
    with pytest.raises(AssertionError):
        flame(torch.zeros(2, flame.n_shape), torch.zeros(2, flame.n_exp), torch.zeros(2, 6))
    gen = torch.Generator().manual_seed(3)
    s, e = torch.randn(3, flame.n_shape, generator=gen), torch.randn(3, flame.n_exp, generator=gen)
    p = torch.randn(3, 15, generator=gen) * 0.3
    batch = flame(s, e, p)
    single = flame(s[1:2], e[1:2], p[1:2])
    assert torch.allclose(batch[1:2], single, atol=1e-6)
    assert torch.allclose(batch.double(), flame.double()(s.double(), e.double(), p.double()),
                          atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    flame = FLAME()
    s, e, p = torch.randn(2, flame.n_shape), torch.randn(2, flame.n_exp), torch.randn(2, 15) * 0.3
    cpu = flame(s, e, p)
    gpu = flame.cuda()(s.cuda(), e.cuda(), p.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)


def test_npz_round_trip(tmp_path):
    model = random_model()
    path = tmp_path / "model.npz"
    save_npz(model, path)
    loaded = load_flame(path)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "parents",
                "faces"):
        assert np.array_equal(loaded[key], model[key]), key


def test_chumpy_era_pickle_loads_without_chumpy(tmp_path, monkeypatch):
    """A pickle shaped like FLAME 2020's: chumpy Ch arrays, a scipy csc J_regressor, uint32
    faces 'f', a kintree_table with 2**32 - 1 as the root's parent, byte-string keys."""
    model = random_model()
    fake_chumpy, fake_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x
            self._dirty_vars = set()

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    fake_ch.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", fake_chumpy)
    monkeypatch.setitem(sys.modules, "chumpy.ch", fake_ch)
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32)
    payload = {b"v_template": Ch(model["v_template"]), "shapedirs": Ch(model["shapedirs"]),
               "posedirs": model["posedirs"], "weights": model["weights"],
               "J_regressor": scipy.sparse.csc_matrix(model["J_regressor"]),
               "f": model["faces"].astype(np.uint32), "kintree_table": kintree,
               "bs_style": "lbs"}
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    monkeypatch.delitem(sys.modules, "chumpy")
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    loaded = load_flame(path)
    assert "chumpy" not in sys.modules
    assert np.array_equal(loaded["v_template"], model["v_template"])
    assert np.array_equal(loaded["shapedirs"], model["shapedirs"])
    assert np.allclose(loaded["J_regressor"], model["J_regressor"])
    assert loaded["parents"].tolist() == [-1, 0, 1, 1, 1]
    assert loaded["faces"].dtype == np.int64 and np.array_equal(loaded["faces"], model["faces"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + _Exploit.target,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Exploit.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Exploit()}, protocol=2))
    with pytest.raises(FlameModelError, match="refused global '(posix|nt|os).system'"):
        load_flame(path)
    assert not os.path.exists(_Exploit.target)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FlameModelError, match="no such file.*flame.is.tue.mpg.de"):
        load_flame(tmp_path / "missing.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(FlameModelError, match="junk.pkl: not a readable FLAME model"):
        load_flame(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, v_template=np.zeros((3, 3)))
    with pytest.raises(FlameModelError, match="missing keys"):
        load_flame(partial)
    model = random_model()
    model["posedirs"] = model["posedirs"][..., :30]
    save_npz(model, tmp_path / "bad.npz")
    with pytest.raises(FlameModelError, match=r"'posedirs' has shape \(30, 3, 30\)"):
        load_flame(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="n_shape=5: the model has 4 shape directions"):
        FLAME(random_model(), n_shape=5)


def test_obj_uvs_give_per_corner_uvs_in_face_order(tmp_path):
    obj = tmp_path / "head_template.obj"
    obj.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\n"
                   "vt 0.0 0.0\nvt 1.0 0.0\nvt 0.0 1.0\nvt 0.5 0.5\n"
                   "f 1/1 2/2 3/3\nf 2/2 4/4 3/3\n")
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    uvs = load_obj_uvs(obj, faces)
    assert uvs.shape == (2, 3, 2)
    assert np.array_equal(uvs[1], [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    with pytest.raises(FlameModelError, match="faces differ"):
        load_obj_uvs(obj, faces[:, ::-1])
    broken = tmp_path / "broken.obj"
    broken.write_text("v 0 0 0\nf 1 2 3\n")
    with pytest.raises(FlameModelError, match="broken.obj: not a readable OBJ"):
        load_obj_uvs(broken)
    model = random_model(n_vertices=4)
    model["faces"] = faces
    model["face_uvs"] = uvs
    assert FLAME(model, n_shape=2, n_exp=1).face_uvs.shape == (2, 3, 2)


def test_the_preview_in_docs_is_what_the_command_draws(tmp_path):
    """docs/flame_preview.png is `python -m assets.flame_files --preview docs/flame_preview.png`
    of today's head (float64 rendering: equal to within one 8-bit level on another machine)."""
    from PIL import Image

    from assets import flame_files
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flame_files._preview(tmp_path / "preview.png")
    drawn, shipped = (np.asarray(Image.open(path), dtype=np.int16) for path in (
        tmp_path / "preview.png", os.path.join(root, "docs", "flame_preview.png")))
    assert drawn.shape == shipped.shape and np.abs(drawn - shipped).max() <= 1
