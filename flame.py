"""FLAME, the articulated 3D face model of Li et al. 2017, with linear blend skinning.

FLAME ("Learning a model of facial shape and expression from 4D scans", SIGGRAPH Asia 2017, Sec. 3)
maps shape β, expression ψ and pose θ to vertices:

    T_P(β, ψ, θ) = T̄ + B_S(β; S) + B_E(ψ; E) + B_P(θ; P)             (blendshapes, Eq. 2)
    B_P(θ; P)    = Σ_n (R_n(θ) − R_n(θ*)) P_n                          (pose correctives, Eq. 5)
    J(β)         = 𝒥 (T̄ + B_S(β; S))                                   (joint regressor)
    M(β, ψ, θ)   = W(T_P, J, θ, 𝒲)                                     (skinning, Eq. 1)

with 5 joints [global, neck, jaw, left eye, right eye] in a kinematic tree
(global → neck → jaw, eyes).
W is linear blend skinning: each vertex moves by the weight-blended rigid transforms of the joints,
each joint's transform being the product of its ancestors' rotations about their rest positions.
We follow the FLAME paper; the index conventions were checked against the public FLAME 2020 file
layout and the smplx `lbs` function, whose numbered steps `lbs` below follows.

Two sources of model arrays, one code path:
- `load_flame(path)` reads FLAME 2020's `generic_model.pkl` (chumpy-era Python-2 pickle) without
  chumpy and without executing anything from the file, or an `.npz` with the same keys;
- `head.builtin_head()` builds a procedural head in the same format (no licensed file needed).

Letters: B batch, V vertices, F faces, J joints (5), K blendshape directions, P pose features (36).
"""
import argparse
import io
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn as nn

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
POSE_DIM = 3 * len(JOINT_NAMES)
FLAME_SHAPE_BASIS = 300  # FLAME's `shapedirs` hold 300 shape, then 100 expression directions
DEFAULT_N_SHAPE, DEFAULT_N_EXP = 100, 50  # the coefficients DECA (Feng et al. 2021) uses
RODRIGUES_EPS = 1e-8  # angle² below which Rodrigues' formula is its Taylor expansion (no 0/0)
REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "parents",
                 "faces")


class FlameModelError(ValueError):
    """A FLAME model file that is missing, unreadable or not a FLAME model."""


# Loading without chumpy: a restricted unpickler

class _Inert:
    """Stands in for a chumpy object; keeps the pickled state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _Sparse(_Inert):
    """Stands in for a scipy.sparse matrix; keeps (data, indices, indptr, shape)."""


def _new_placeholder(cls, base=object, state=None):
    # Python 2's copy_reg._reconstructor(cls, base, state) creates `cls` instances; we only ever
    # allow it to create our own placeholders.
    if cls not in (_Inert, _Sparse):
        raise pickle.UnpicklingError(f"refused to reconstruct {cls!r}")
    return cls.__new__(cls)


def _encode_latin1(text, encoding="latin1"):
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_multiarray = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2 renamed numpy.core
# protocol-2 pickles written by Python 3 wrap raw bytes as _codecs.encode(text, "latin1")
_ALLOWED_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                    ("_codecs", "encode"): _encode_latin1,
                    ("copy_reg", "_reconstructor"): _new_placeholder,
                    ("copyreg", "_reconstructor"): _new_placeholder}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # old pickles name the former
    for _name in ("_reconstruct", "scalar"):
        _ALLOWED_GLOBALS[(_module, _name)] = getattr(_multiarray, _name)
for _module in ("__builtin__", "builtins"):  # inert containers chumpy objects keep in their state
    for _type in (object, set, frozenset):
        _ALLOWED_GLOBALS[(_module, _type.__name__)] = _type
for _module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr"):
    for _name in ("csc_matrix", "csr_matrix"):
        _ALLOWED_GLOBALS[(_module, _name)] = _Sparse


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only the numpy / scipy.sparse / chumpy names a FLAME pickle needs.

    chumpy classes become inert placeholders whose state we convert to arrays ourselves, so loading
    never imports chumpy and never calls anything named by the file beyond the list above.
    """

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _Inert
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'")
        return _ALLOWED_GLOBALS[(module, name)]


def _to_array(value, key):
    """Converts a loaded value (array, chumpy placeholder, sparse placeholder) to a numpy array."""
    if isinstance(value, _Sparse):
        import scipy.sparse
        state = value.state
        fmt = scipy.sparse.csr_matrix if state.get("format") == "csr" else scipy.sparse.csc_matrix
        matrix = fmt((state["data"], state["indices"], state["indptr"]),
                     shape=state.get("_shape", state.get("shape")))
        return np.asarray(matrix.todense())
    if isinstance(value, _Inert):  # a chumpy Ch array keeps its value in state["x"]
        if not isinstance(value.state, dict) or "x" not in value.state:
            raise FlameModelError(f"key '{key}' is a chumpy expression, not a plain array")
        return _to_array(value.state["x"], key)
    return np.asarray(value)


def load_flame(path):
    """Reads a FLAME model file (`generic_model.pkl` or an `.npz` with the same keys).

    Returns a dict of numpy arrays: v_template (V,3), shapedirs (V,3,K) (FLAME: 300 shape then 100
    expression directions), posedirs (V,3,36), J_regressor (J,V) dense, weights (V,J),
    parents (J,) int64 with -1 for the root, faces (F,3) int64. Loading never executes code from the
    file: the pickle goes through a restricted unpickler that refuses every unexpected global.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FlameModelError(f"{path}: no such file; FLAME is obtained from "
                              "https://flame.is.tue.mpg.de (free registration)")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                raw = {key: data[key] for key in data.files}
        else:
            with open(path, "rb") as f:
                raw = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, KeyError) as error:
        raise FlameModelError(f"{path}: not a readable FLAME model ({error})") from None
    if not isinstance(raw, dict):
        raise FlameModelError(f"{path}: expected a dict of arrays, found {type(raw).__name__}")
    raw = {key.decode("latin1") if isinstance(key, bytes) else key: v for key, v in raw.items()}
    if "faces" not in raw and "f" in raw:
        raw["faces"] = raw["f"]
    if "parents" not in raw and "kintree_table" in raw:
        raw["parents"] = _to_array(raw["kintree_table"], "kintree_table")[0]
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise FlameModelError(f"{path}: not a FLAME model, missing keys {missing}")
    model = {key: _to_array(raw[key], key).astype(np.float64) for key in REQUIRED_KEYS[:5]}
    parents = _to_array(raw["parents"], "parents").astype(np.int64)
    model["parents"] = np.where(parents >= 2**31, -1, parents)  # FLAME's root parent: 2**32 - 1
    model["faces"] = _to_array(raw["faces"], "faces").astype(np.int64)
    for key in ("face_uvs", "albedo_mean", "albedo_dirs", "n_shape_basis"):  # our .npz extras
        if key in raw:
            model[key] = np.asarray(raw[key])
    _check_model(model, path)
    return model


def _check_model(model, name):
    """FlameModelError unless the arrays have FLAME's layout for their V vertices and J joints."""
    n_vertices, n_joints = model["v_template"].shape[0], model["parents"].shape[0]
    expected = {"v_template": (n_vertices, 3), "J_regressor": (n_joints, n_vertices),
                "weights": (n_vertices, n_joints), "posedirs": (n_vertices, 3, 9 * (n_joints - 1)),
                "shapedirs": (n_vertices, 3, model["shapedirs"].shape[-1])}
    for key, shape in expected.items():
        if model[key].shape != shape:
            raise FlameModelError(f"{name}: '{key}' has shape {model[key].shape}, expected {shape}")
    faces = model["faces"]
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= n_vertices:
        raise FlameModelError(f"{name}: 'faces' must be (F,3) indices below {n_vertices}")


def load_obj_uvs(path, faces=None):
    """Per-corner UVs (F, 3, 2) from a Wavefront OBJ such as DECA's `head_template.obj`.

    FLAME's files carry no UVs; DECA ships them as an OBJ whose `f v/vt ...` lines list the faces
    in FLAME's order. Pass the model's `faces` (F, 3) to check that the OBJ's vertex indices match
    them. Use: `model["face_uvs"] = load_obj_uvs("head_template.obj", model["faces"])`.
    """
    path = os.fspath(path)
    uvs, vertex_faces, uv_faces = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if parts[:1] == ["vt"]:
                    uvs.append([float(parts[1]), float(parts[2])])
                elif parts[:1] == ["f"]:
                    corners = [corner.split("/") for corner in parts[1:]]
                    if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                        raise ValueError(f"line {number}: expected a triangle 'f v/vt v/vt v/vt'")
                    vertex_faces.append([int(c[0]) - 1 for c in corners])  # OBJ counts from 1
                    uv_faces.append([int(c[1]) - 1 for c in corners])
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as error:
        raise FlameModelError(f"{path}: not a readable OBJ with UVs ({error})") from None
    uvs, uv_faces = np.asarray(uvs), np.asarray(uv_faces, dtype=np.int64)
    if len(uv_faces) == 0 or uv_faces.max() >= len(uvs) or uv_faces.min() < 0:
        raise FlameModelError(f"{path}: no faces, or face UV indices outside the {len(uvs)} 'vt'")
    if faces is not None and not np.array_equal(np.asarray(vertex_faces), np.asarray(faces)):
        raise FlameModelError(f"{path}: its faces differ from the model's (another topology?)")
    return uvs[uv_faces]  # (F, 3, 2)


def save_npz(model, path):
    """Writes a model dict (from `load_flame` or `builtin_head`) as a plain `.npz` (no pickle)."""
    np.savez(path, **{key: np.asarray(value) for key, value in model.items()})


# Linear blend skinning

def pose6_to_flame15(pose6):
    """DECA's pose (B, 6) = [global, jaw] -> FLAME's full pose (B, 15); neck and eyes are zero
    (DECA does not estimate them)."""
    assert pose6.shape[-1] == 6, pose6.shape
    zeros = pose6.new_zeros(pose6.shape[0], 3)
    return torch.cat([pose6[:, :3], zeros, pose6[:, 3:], zeros, zeros], dim=1)  # (B, 15)


def flame15_to_pose6(flame15):
    """FLAME's full pose (B, 15) -> DECA's (B, 6) = [global, jaw]; neck and eyes are dropped."""
    assert flame15.shape[-1] == POSE_DIM, flame15.shape
    return torch.cat([flame15[:, 0:3], flame15[:, 6:9]], dim=1)  # (B, 6): joints 0 and 2


def rodrigues(axis_angle):
    """Rotation matrices from axis-angle vectors, R = I + sin(a) K + (1 − cos(a)) K².

    Parameters: axis_angle (..., 3), angle a = |axis_angle|, K the cross-product matrix of the unit
    axis. Returns (..., 3, 3). Near a = 0 the Taylor forms sin(a)/a ≈ 1 − a²/6 and
    (1 − cos a)/a² ≈ 1/2 − a²/24 keep values and gradients finite.
    """
    angle_sq = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = angle_sq < RODRIGUES_EPS
    safe_sq = torch.where(small, torch.ones_like(angle_sq), angle_sq)
    angle = safe_sq.sqrt()
    sin_term = torch.where(small, 1 - angle_sq / 6, torch.sin(angle) / angle)
    cos_term = torch.where(small, 0.5 - angle_sq / 24, (1 - torch.cos(angle)) / safe_sq)
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1)
    cross = cross.reshape(axis_angle.shape[:-1] + (3, 3))  # (..., 3, 3), unnormalised K·a
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin_term * cross + cos_term * (cross @ cross)


def forward_kinematics(rotations, joints, parents):
    """The kinematic chain (step 4 of `lbs`, as smplx's batch_rigid_transform):
    G_j = G_parent(j) · [R_j | J_j − J_parent(j)], then A_j = G_j · [I | −J_j].

    rotations (B, J, 3, 3), joints (B, J, 3) at rest, parents: list of J ints (-1 for the root).
    Returns the posed joints (B, J, 3) and the rest-relative transforms A_j (B, J, 4, 4)."""
    batch = rotations.shape[0]
    rel_joints = joints.clone()
    rel_joints[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
    local = torch.zeros(batch, len(parents), 4, 4, dtype=rotations.dtype,
                        device=rotations.device)
    local[..., :3, :3] = rotations
    local[..., :3, 3] = rel_joints
    local[..., 3, 3] = 1
    chain = [local[:, 0]]
    for j in range(1, len(parents)):  # J = 5 joints: a loop over the tree, not over data
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, 1)  # (B, J, 4, 4)
    posed_joints = world[..., :3, 3]  # (B, J, 3)
    # remove the rest position: A_j = G_j · [I | −J_j]
    transforms = world.clone()
    transforms[..., :3, 3] = posed_joints - torch.einsum("bjik,bjk->bji", world[..., :3, :3],
                                                         joints)
    return posed_joints, transforms


def lbs(coefficients, pose, v_template, shapedirs, posedirs, J_regressor, parents, weights):
    """FLAME's vertices by linear blend skinning (Li et al. 2017, Eq. 1–5).

    Parameters
    ----------
    coefficients : (B, K) shape then expression coefficients [β, ψ].
    pose : (B, J*3) axis-angle per joint θ.
    v_template : (V, 3) mean template T̄.
    shapedirs : (V, 3, K) shape then expression directions [S, E].
    posedirs : (P, V*3) pose-corrective directions, P = 9 (J − 1).
    J_regressor : (J, V).   parents : list of J ints (-1 for the root).   weights : (V, J).

    Returns
    -------
    vertices (B, V, 3), joints (B, J, 3) posed, transforms (B, J, 4, 4): the rest-relative rigid
    transform A_j of each joint (maps a rest-pose point skinned fully to that joint to its place).
    """
    batch = pose.shape[0]
    # 1. shape blendshapes: T̄ + B_S(β) + B_E(ψ), offsets_bvc = Σ_k S_vck · c_bk
    v_shaped = v_template + torch.einsum("vck,bk->bvc", shapedirs, coefficients)  # (B, V, 3)
    # 2. joints regressed from the shaped, not yet posed mesh: J_jc = Σ_v 𝒥_jv · v_vc
    joints = torch.einsum("jv,bvc->bjc", J_regressor, v_shaped)  # (B, J, 3)
    # 3. pose blendshapes: features (R_n(θ) − I) of the non-root joints (Eq. 5 with θ* = 0)
    rotations = rodrigues(pose.reshape(batch, -1, 3))  # (B, J, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)  # (B, P)
    v_posed = v_shaped + (pose_feature @ posedirs).reshape(batch, -1, 3)  # (B, V, 3)
    # 4. forward kinematics: each joint's posed position and rest-relative transform A_j
    posed_joints, transforms = forward_kinematics(rotations, joints, parents)
    # 5. skinning: T_v = Σ_j w_vj A_j, of which only the top rows [R_v | t_v] matter, then
    # v' = t_v + R_v v. Blended per item (as smplx does), T comes out in vertex order, where the
    # B·V small products run 4x faster than in the (V, B) order of one (V, J) @ (J, B·16) product.
    T = (weights @ transforms[:, :, :3].reshape(batch, -1, 12)).view(-1, 3, 4)  # (B·V, 3, 4)
    vertices = torch.baddbmm(T[..., 3:], T[..., :3], v_posed.reshape(-1, 3, 1))  # (B·V, 3, 1)
    vertices = vertices.view(batch, -1, 3)  # (B, V, 3)
    return vertices, posed_joints, transforms


class FLAME(nn.Module):
    """FLAME as an nn.Module: (shape, expression, pose) → vertices.

    Parameters
    ----------
    model : dict from `load_flame` or `head.builtin_head`, a path to a FLAME file, or None for the
        built-in procedural head.
    n_shape, n_exp : how many shape / expression coefficients to use (None: DECA's 100 / 50, capped
        by what the model has). Expression directions start after the model's shape basis
        (column 300 for FLAME files, as DECA does).

    Attributes: n_shape, n_exp, faces (F,3) long buffer; face_uvs (F,3,2) and the albedo space
    (albedo_mean (3,T,T), albedo_dirs (A,3,T,T), n_albedo) when the model carries them.
    """

    def __init__(self, model=None, n_shape=None, n_exp=None):
        super().__init__()
        if model is None:
            from head import builtin_head
            model = builtin_head()
        elif not isinstance(model, dict):
            model = load_flame(model)
        _check_model(model, "FLAME model")
        shape_basis = int(model.get("n_shape_basis", FLAME_SHAPE_BASIS))
        n_exp_available = model["shapedirs"].shape[2] - shape_basis
        self.n_shape = min(DEFAULT_N_SHAPE, shape_basis) if n_shape is None else int(n_shape)
        self.n_exp = min(DEFAULT_N_EXP, n_exp_available) if n_exp is None else int(n_exp)
        if not 0 <= self.n_shape <= shape_basis:
            raise ValueError(f"n_shape={self.n_shape}: the model has {shape_basis} shape "
                             "directions")
        if not 0 <= self.n_exp <= n_exp_available:
            raise ValueError(f"n_exp={self.n_exp}: the model has {n_exp_available} expression "
                             "directions")
        self.parents = [int(p) for p in model["parents"]]
        if self.parents[0] != -1 or any(p >= j for j, p in enumerate(self.parents[1:], 1)):
            raise ValueError(f"parents {self.parents}: the root must come first, parents before "
                             "children")
        dirs = np.concatenate([model["shapedirs"][..., :self.n_shape],
                               model["shapedirs"][..., shape_basis:shape_basis + self.n_exp]], 2)
        posedirs = model["posedirs"].reshape(-1, model["posedirs"].shape[2]).T  # (P, V*3)
        buffers = {"v_template": model["v_template"], "blenddirs": dirs, "posedirs": posedirs,
                   "J_regressor": model["J_regressor"], "weights": model["weights"]}
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32),
                                 persistent=False)  # rebuilt from the model file, never saved
        self.register_buffer("faces", torch.as_tensor(model["faces"], dtype=torch.long),
                             persistent=False)
        for name in ("face_uvs", "albedo_mean", "albedo_dirs"):  # None when the model lacks them
            value = torch.as_tensor(model[name], dtype=torch.float32) if name in model else None
            self.register_buffer(name, value, persistent=False)
        self.n_albedo = 0 if self.albedo_dirs is None else self.albedo_dirs.shape[0]

    def forward(self, shape, expression, pose, return_transforms=False):
        """shape (B, n_shape), expression (B, n_exp), pose (B, 15) axis-angle in FLAME's joint
        order [global, neck, jaw, left eye, right eye] → vertices (B, V, 3).

        With return_transforms, also the joints' rest-relative transforms (B, 5, 4, 4), which move
        geometry attached rigidly to a joint (hair to the neck joint, say) with the head.
        """
        assert (shape.shape[1], expression.shape[1], pose.shape[1]) == (
            self.n_shape, self.n_exp, POSE_DIM), (shape.shape, expression.shape, pose.shape)
        coefficients = torch.cat([shape, expression], 1).to(self.blenddirs.dtype)  # (B, K)
        vertices, _, transforms = lbs(coefficients, pose.to(coefficients.dtype), self.v_template,
                                      self.blenddirs, self.posedirs, self.J_regressor,
                                      self.parents, self.weights)
        return (vertices, transforms) if return_transforms else vertices

    def albedo(self, coefficients):
        """Albedo texture (B, 3, T, T) in [0, 1] = mean + Σ_a coefficients_a · direction_a."""
        assert self.n_albedo and coefficients.shape[1:] == (self.n_albedo,), (
            f"albedo coefficients {tuple(coefficients.shape)}; the model has {self.n_albedo}")
        texture = self.albedo_mean + torch.einsum("ba,achw->bchw", coefficients.to(
            self.albedo_dirs.dtype), self.albedo_dirs)  # (B, 3, T, T)
        return texture.clamp(0, 1)


def _preview(path, size=128, n=8):
    """Renders rows of n heads to a PNG: random shapes, each expression, jaw and gaze, turns."""
    from PIL import Image
    from render import Renderer
    from head import EXPRESSION_NAMES
    flame = FLAME().double()
    n_heads = (3 + -(-flame.n_exp // n)) * n
    shape = torch.zeros(n_heads, flame.n_shape, dtype=torch.float64)
    expression = torch.zeros(n_heads, flame.n_exp, dtype=torch.float64)
    pose = torch.zeros(n_heads, 15)
    gen = torch.Generator().manual_seed(0)
    shape[1:n] = 1.5 * torch.randn(n - 1, flame.n_shape, generator=gen, dtype=torch.float64)
    expression[n + torch.arange(flame.n_exp), torch.arange(flame.n_exp)] = 1.0
    jaw_and_gaze, turn = pose[-2 * n:-n], pose[-n:]
    jaw_and_gaze[:4, 6] = torch.linspace(0, 0.4, 4)  # jaw opening (rotation about x)
    gaze = torch.tensor([[-0.3, 0.0], [0.3, 0.0], [0.0, 0.4], [0.0, -0.4]])  # up, down, left, right
    jaw_and_gaze[4:, 9:11] = jaw_and_gaze[4:, 12:14] = gaze
    turn[:, 1] = torch.linspace(-0.8, 0.8, n)  # yaw
    renderer = Renderer(flame.faces, flame.face_uvs, size).double()
    light = torch.zeros(n, 9, 3, dtype=torch.float64)
    light[:, :4] = torch.tensor([2.6, -0.35, 0.3, 0.5], dtype=torch.float64)[:, None]
    cam = torch.tensor([[7.0, 0.0, 0.0]], dtype=torch.float64).repeat(n, 1)
    albedo = flame.albedo(torch.zeros(n, flame.n_albedo, dtype=torch.float64))
    rows = []
    for i in range(0, n_heads, n):
        vertices = flame(shape[i:i + n], expression[i:i + n], pose[i:i + n].double())
        out = renderer(vertices, albedo, light, cam)
        image = out["image"] + (1 - out["mask"]) * 0.25  # (n, 3, H, W) on a grey backdrop
        rows.append(torch.cat(list(image), 2))  # (3, H, n*W)
    grid = torch.cat(rows, 1).clamp(0, 1).permute(1, 2, 0).numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    print(f"wrote {path}; rows: shapes, expressions {', '.join(EXPRESSION_NAMES)}, jaw/eyes, yaw")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preview", metavar="PNG", required=True,
                        help="render the built-in head's shapes, expressions and poses")
    _preview(parser.parse_args().preview)
