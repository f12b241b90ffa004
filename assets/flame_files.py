"""FLAME's files: the model's readers and writers, and a preview of the built-in head.

The equations live in flame.py; this module only turns files into the dict of numpy arrays that
`flame.FLAME` takes (and back), so the model runs on FLAME's licensed files or on the built-in head
(`assets.head.builtin_head()`, same keys) alike. Formats:
- FLAME 2020's `generic_model.pkl` (https://flame.is.tue.mpg.de, free registration): a Python-2
  pickle of a dict whose arrays are chumpy `Ch` objects, with a scipy.sparse `J_regressor`, the
  faces under `f` and the kinematic tree as `kintree_table`;
- an `.npz` with the keys `load_flame` returns (`save_npz` writes one; no pickle inside);
- DECA's `head_template.obj`, whose `f v/vt ...` lines give per-corner UVs (`load_obj_uvs`);
- `FLAME_albedo_from_BFM.npz`, the albedo space DECA uses (`load_bfm_albedo`).

Why a restricted unpickler: unpickling calls whatever functions the file names (a pickle can
say "call os.system with this string"), so the obvious route — install chumpy (unmaintained; it
no longer imports on current numpy) and call `pickle.load` — would run any code a tampered file
carries. `_RestrictedUnpickler` loads without chumpy instead: chumpy objects become inert
placeholders whose stored arrays we read ourselves, and every global outside a short numpy /
scipy.sparse list is refused, so nothing from the file is ever executed.

Preview (run from the repository root):

    python -m assets.flame_files --preview head.png  # shapes, expressions, poses

Letters: V vertices, F faces, J joints (5), K blendshape directions.
"""
import argparse
import io
import os
import pickle
import zipfile

import numpy as np

from assets.head import TEXTURE_SIZE

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
    check_model(model, path)
    return model


def check_model(model, name):
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


def load_bfm_albedo(path, n_albedo, size=TEXTURE_SIZE):
    """The albedo space of `FLAME_albedo_from_BFM.npz`, the texture space that the BFM_to_FLAME
    conversion makes from the Basel Face Model 2017's vertex colours (Gerig et al. 2018) and
    DECA (Feng et al. 2021) uses: {"albedo_mean" (3, T, T), "albedo_dirs" (A, 3, T, T)} in
    [0, 1] colour units, for a model dict (`model.update(...)`), T = size, A = n_albedo.

    The file's MU holds the mean texture and PC its principal directions (one column each),
    flattened from (T', T', 3) arrays, rows first (row 0 is the top, v = 1, as sample_texture
    reads it) and colours in B, G, R order. As DECA does, we keep the first A directions,
    resize T' (512) to T (256) by nearest neighbour (texel i ← ⌊i·T'/T⌋) and reorder to RGB.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FlameModelError(f"{path}: no such file; it comes from the BFM_to_FLAME conversion "
                              "(https://github.com/TimoBolkart/BFM_to_FLAME)")
    try:
        with np.load(path, allow_pickle=False) as data:
            mean, dirs = data["MU"].reshape(-1), data["PC"]
            side = int(round((mean.size / 3) ** 0.5))
            if mean.size != 3 * side * side or dirs.size % mean.size:
                raise ValueError(f"MU has {mean.size} values, not a T × T × 3 texture")
            dirs = dirs.reshape(mean.size, -1)[:, :n_albedo]  # (T'·T'·3, A)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise FlameModelError(f"{path}: not a readable FLAME albedo space with MU and PC "
                              f"({error})") from None
    if dirs.shape[1] < n_albedo:
        raise FlameModelError(f"{path}: {dirs.shape[1]} albedo directions, {n_albedo} needed")
    texels = np.arange(size) * side // size  # (T,) nearest neighbour
    grid = np.ix_(texels, texels, [2, 1, 0])  # rows, columns, BGR -> RGB
    mean = mean.reshape(side, side, 3)[grid].transpose(2, 0, 1)  # (3, T, T)
    dirs = dirs.reshape(side, side, 3, -1)[grid].transpose(3, 2, 0, 1)  # (A, 3, T, T)
    return {"albedo_mean": mean.astype(np.float32), "albedo_dirs": dirs.astype(np.float32)}


def save_npz(model, path):
    """Writes a model dict (from `load_flame` or `builtin_head`) as a plain `.npz` (no pickle)."""
    np.savez(path, **{key: np.asarray(value) for key, value in model.items()})


# The preview: the built-in head through FLAME and the renderer

def _preview(path, size=128, n=8):
    """Renders rows of n heads to a PNG: random shapes, each expression, jaw and gaze, turns."""
    import torch
    from PIL import Image

    from assets.head import EXPRESSION_NAMES
    from flame import FLAME
    from render import Renderer
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
