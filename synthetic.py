"""Synthetic portraits with exact ground truth: the project's built-in training and test data.

DiffFAE trains on pairs of frames of one person (VoxCeleb1, paper §5.1): a source I_S and a
query I_Q that share identity, hair, clothes and background but differ in pose, expression and
lighting.
VoxCeleb and FLAME cannot ship, so this module renders such pairs procedurally from the built-in
head (head.py) with render.py, and — unlike any real dataset — knows every generating coefficient
and, for cross-identity test pairs, the exact ground-truth edit.

A scene is three meshes rasterized together into one z-buffer, lit by one SH light:
- the head (FLAME, skin, eyes and mouth → region "face"), posed by the frame's FLAME pose;
- a hair shell (region "hair"): a surface a style-dependent distance outside the shaped skull
  (inside it where there is no hair, so it hides), optionally with long hair falling as a capped
  cylinder behind the ears; it rides rigidly on the neck joint, so turning the head changes what
  hair shows and what it occludes;
- a torso (region "clothes"): a super-ellipsoid under the neck with a patterned UV texture;
and an unlit backdrop (region "background"): a gradient with stripes or soft blobs.
Identity (seeded by its id): shape β, albedo α, hair style and colour, clothes and background.
Frame (seeded by item and slot): head pose (yaw ±40°, pitch, roll), jaw, gaze, expression, SH light
(ambient plus a directional part), camera jitter.

Letters: B batch, V vertices, F faces, H/W image size, T texture size.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch.utils.data import Dataset

import head
from flame import FLAME, flame15_to_pose6
from layers import BACKGROUND, CLOTHES, FACE, HAIR
from render import interpolate, project, rasterize, sample_texture, sh_shading, vertex_normals

# Bump whenever a change alters the rendered images: cached pools are named by it.
DATA_VERSION = 2
TEST_ID_OFFSET = 10 ** 6       # test identities are drawn from ids disjoint from training's
TRAIN_IDENTITIES = 100_000
DEFAULT_LENGTH = {"train": 100_000, "test": 1000}

# Camera: DECA's [s, tx, ty]; s = 5.8 shows 0.34 m of height, centred 4.5 cm below the eyes.
CAM_SCALE, CAM_TY = 5.8, 0.045
CAM_JITTER_SCALE, CAM_JITTER_SHIFT = 0.05, 0.015
# Frame distributions (radians).
MAX_YAW, MAX_PITCH, MAX_ROLL = math.radians(40), math.radians(15), math.radians(10)
JAW_MEAN, JAW_STD, JAW_MAX = 0.05, 0.12, 0.4
GAZE_STD = 0.12
EXPRESSION_NOISE, MAX_ACTIVE_EXPRESSIONS = 0.15, 2
# SH light: ambient DC in DECA's units (c0·DC ≈ 0.85 shading) and a directional first-order part.
LIGHT_DC = (2.6, 3.4)
LIGHT_DIRECTIONAL = (0.4, 1.0)
LIGHT_SECOND_ORDER_STD = 0.08
# Hair: a shell this far outside the skull, or this far inside it where there is no hair.
HAIR_THICKNESS = (0.008, 0.03)
HAIR_HIDDEN = -0.025
HAIR_COLOURS = ((0.05, 0.04, 0.035), (0.18, 0.11, 0.07), (0.35, 0.22, 0.12), (0.45, 0.2, 0.08),
                (0.75, 0.6, 0.35), (0.6, 0.58, 0.55))
HAIR_GRID_STRIDE = 4           # the hair shell takes every 4th fine row / column of the skin grid
# Torso super-ellipsoid (metres), centred under the neck; exponent > 2 squares the shoulders.
TORSO_SEMI_AXES = (0.22, 0.13, 0.11)
TORSO_TOP, TORSO_Z, TORSO_EXPONENT, SHOULDER_DROP = -0.165, -0.02, 2.6, 0.06
TORSO_ROWS, TORSO_COLS = 18, 32
TEXTURE = 64                   # size of the hair and clothes textures


def _rng(*key):
    """A numpy generator seeded by integers: the same numbers on every machine (PCG64)."""
    return np.random.default_rng([int(k) for k in key])


def _grid_uv(corners, n_rows, n_cols):
    """Per-corner UVs of a latitude-longitude grid: u along the columns, v from 1 down to 0."""
    return np.stack([corners[..., 1] / n_cols, 1 - corners[..., 0] / (n_rows - 1)], -1)


class PortraitRenderer:
    """Renders scenes (head, hair, torso, backdrop) from identity and frame parameters.

    Holds the fixed topology of the three meshes and what ties the hair shell to the skin.
    """

    def __init__(self, flame):
        self.flame = flame
        rows, cols = head.skin_grid()
        fine_rows = (rows >= 72) & (rows < 152)
        fine_cols = np.abs(cols) < 66
        keep_r = np.flatnonzero(~fine_rows | (np.cumsum(fine_rows) % HAIR_GRID_STRIDE == 1))
        keep_c = np.flatnonzero(~fine_cols | (np.cumsum(fine_cols) % HAIR_GRID_STRIDE == 1))
        hair_faces, hair_corners = head.latlong_faces(len(keep_r), len(keep_c))
        ring_index = 1 + (keep_r[1:-1, None] - 1) * len(cols) + keep_c[None, :]  # (R'-2, C')
        n_skin = 2 + (len(rows) - 2) * len(cols)
        self.hair_skin = np.concatenate([[0], ring_index.ravel(), [n_skin - 1]])  # (Vhair,)
        theta, phi = head.grid_angles(rows[keep_r], cols[keep_c])
        self.hair_theta, self.hair_phi = theta, phi
        torso_faces, torso_corners = head.latlong_faces(TORSO_ROWS, TORSO_COLS)
        t_theta, t_phi = head.grid_angles(np.linspace(0, 180, TORSO_ROWS),
                                           np.linspace(-180, 180, TORSO_COLS, endpoint=False))
        self.torso_direction = head.direction(t_theta, t_phi)  # (Vt, 3)

        n_head, n_hair = flame.v_template.shape[0], len(theta)
        self.faces = torch.as_tensor(np.concatenate([
            flame.faces.numpy(), hair_faces + n_head, torso_faces + n_head + n_hair]))
        head_uvs = flame.face_uvs.numpy()
        self.face_uvs = torch.as_tensor(np.concatenate([
            head_uvs, _grid_uv(hair_corners, len(keep_r), len(keep_c)),
            _grid_uv(torso_corners, TORSO_ROWS, TORSO_COLS)]), dtype=torch.float32)
        self.face_part = torch.as_tensor(np.repeat(
            [FACE, HAIR, CLOTHES], [len(flame.faces), len(hair_faces), len(torso_faces)]))
        self.strands = _strand_pattern()

    def hair_shell(self, skin, hair):
        """Hair vertices (B, Vh, 3) in the rest pose from the shaped skin under them (B, Vh, 3)."""
        theta = torch.as_tensor(self.hair_theta, dtype=skin.dtype)  # (Vh,)
        phi = torch.as_tensor(self.hair_phi, dtype=skin.dtype).abs()
        front, side, back, thickness, long_radius = hair[:, 3:8].T[..., None]  # (B, 1) each
        limit = (front + (side - front) * head.smoothstep(30, 90, phi)
                 + (back - side) * head.smoothstep(90, 150, phi))  # (B, Vh) lowest θ with hair
        covered = head.smoothstep(limit + 3, limit - 3, theta)  # (B, Vh) 1 where hair grows
        radius = skin.norm(dim=-1)  # (B, Vh)
        direction = skin / radius[..., None]
        shell = radius + thickness * covered + HAIR_HIDDEN * (1 - covered)
        # long hair falls from behind the ears as a capped cylinder down to the shoulders
        bottom = -0.02 - 0.2 * head.smoothstep(125, 170, back)
        curtain = head.capped_cylinder_radius(direction, long_radius, -0.01, bottom)
        shell = torch.maximum(shell, curtain * covered * head.smoothstep(85, 110, phi))
        return direction * shell[..., None]

    def torso(self, clothes):
        """Torso vertices (B, Vt, 3): a super-ellipsoid with sloping shoulders under the neck."""
        d = torch.as_tensor(self.torso_direction, dtype=clothes.dtype)  # (Vt, 3)
        axes = torch.tensor(TORSO_SEMI_AXES, dtype=clothes.dtype).repeat(len(clothes), 1)
        axes[:, 0] = axes[:, 0] * clothes[:, 8]  # (B, 3)
        radius = ((d[None] / axes[:, None]).abs() ** TORSO_EXPONENT).sum(-1) ** (
            -1 / TORSO_EXPONENT)  # (B, Vt)
        points = d[None] * radius[..., None]
        drop = SHOULDER_DROP * (points[..., 0] / axes[:, None, 0]) ** 2
        centre_y = clothes[:, 9, None] - axes[:, None, 1]  # (B, 1)
        return torch.stack([points[..., 0], points[..., 1] - drop + centre_y,
                            points[..., 2] + TORSO_Z], -1)

    def __call__(self, identity, frame, size):
        """Renders B portraits. identity / frame: dicts of (B, ...) tensors as from
        `sample_identity` / `sample_frame`. Returns images (B, 3, H, W) in [-1, 1] and regions
        (B, H, W) long (0 background, 1 clothes, 2 hair, 3 face)."""
        flame = self.flame
        verts, transforms = flame(identity["shape"], frame["expression"], frame["pose"],
                                  return_transforms=True)
        # the hair follows the shaped (not posed) skin, then rides rigidly on the neck joint
        skin_index = torch.as_tensor(self.hair_skin)
        shape_dirs = flame.blenddirs[skin_index, :, :flame.n_shape]  # (Vh, 3, n_shape)
        skin = flame.v_template[skin_index] + torch.einsum("vck,bk->bvc", shape_dirs,
                                                           identity["shape"])
        rest = self.hair_shell(skin, identity["hair"])
        neck = transforms[:, 1]  # (B, 4, 4) rest-relative transform of the head
        hair = rest @ neck[:, :3, :3].transpose(1, 2) + neck[:, None, :3, 3]
        vertices = torch.cat([verts, hair, self.torso(identity["clothes"])], 1)  # (B, V, 3)

        # every mesh is closed, so faces turned away from the camera are hidden anyway
        fragments = rasterize(project(vertices, frame["cam"], size), self.faces, size,
                              cull_backfaces=True)
        covered = fragments.pix_to_face >= 0  # (B, H, W)
        part = torch.where(covered, self.face_part[fragments.pix_to_face.clamp(min=0)], BACKGROUND)
        normals = interpolate(vertex_normals(vertices, self.faces), self.faces, fragments)
        normals = F.normalize(normals, dim=-1).permute(0, 3, 1, 2)  # (B, 3, H, W)
        uv = interpolate(self.face_uvs, self.faces, fragments)  # (B, H, W, 2)
        skin_texture = flame.albedo(identity["albedo"])  # (B, 3, T, T)
        hair_texture = identity["hair"][:, :3, None, None] * self.strands  # (B, 3, T, T)
        albedo = torch.zeros_like(normals)
        for region, texture in ((FACE, skin_texture), (HAIR, hair_texture),
                                (CLOTHES, clothes_texture(identity["clothes"]))):
            albedo = torch.where((part == region)[:, None], sample_texture(texture, uv), albedo)
        foreground = albedo * sh_shading(normals, frame["light"])
        image = torch.where(covered[:, None], foreground,
                            background_image(identity["background"], size))
        return image.clamp(0, 1) * 2 - 1, part


# ---------------------------------------------------------------------------------------------
# Sampling identities and frames (numpy, seeded: identical on every machine)
# ---------------------------------------------------------------------------------------------

def sample_identity(rng, n_shape, n_albedo):
    """Everything that stays fixed for a person: FLAME shape and albedo, hair, clothes, backdrop.

    Returns a dict of float arrays: shape (n_shape,), albedo (n_albedo,), hair (8,) = [colour 3,
    front / side / back hairline θ in degrees, thickness m, long-hair radius m], clothes (10,) =
    [colour 3, colour 3, pattern, frequency, width scale, top y], background (19,) = [colour 3,
    colour 3, angle, pattern, frequency, phase, 3 × (blob x, y, radius)].
    """
    shape = np.clip(rng.standard_normal(n_shape), -2.5, 2.5)
    albedo = 0.8 * rng.standard_normal(n_albedo)
    albedo[head.ALBEDO_NAMES.index("skin_dark")] = rng.uniform(-1.2, 2.8)  # a wide range of tones
    colour = np.array(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]) * rng.uniform(0.85, 1.15, 3)
    hair = np.concatenate([np.clip(colour, 0, 1), [rng.uniform(52, 70), rng.uniform(88, 106),
                                                   rng.uniform(115, 170),
                                                   rng.uniform(*HAIR_THICKNESS),
                                                   rng.uniform(0.085, 0.1)]])
    clothes = np.concatenate([rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3),
                              [rng.integers(5), rng.uniform(3, 8), rng.uniform(0.9, 1.15),
                               TORSO_TOP + rng.uniform(-0.012, 0.012)]])
    background = np.concatenate([rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3),
                                 [rng.uniform(0, 2 * np.pi), rng.integers(3), rng.uniform(2, 6),
                                  rng.uniform(0, 2 * np.pi)],
                                 np.stack([rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3),
                                           rng.uniform(0.2, 0.6, 3)], 1).ravel()])
    return {"shape": shape, "albedo": albedo, "hair": hair, "clothes": clothes,
            "background": background}


def sample_frame(rng, n_exp):
    """What changes between frames of one person: FLAME expression and pose, SH light, camera.

    Returns a dict of float arrays: expression (n_exp,), pose (15,) FLAME's [global, neck, jaw,
    left eye, right eye] axis-angles, light (9, 3) SH coefficients, cam (3,) = [s, tx, ty].
    """
    yaw, pitch, roll = (rng.uniform(-m, m) for m in (MAX_YAW, MAX_PITCH, MAX_ROLL))
    pose = np.zeros(15)
    pose[:3] = Rotation.from_euler("YXZ", [yaw, pitch, roll]).as_rotvec()
    pose[6] = np.clip(rng.normal(JAW_MEAN, JAW_STD), 0, JAW_MAX)
    gaze = Rotation.from_euler("YX", rng.normal(0, GAZE_STD, 2)).as_rotvec()
    pose[9:12] = pose[12:15] = gaze
    expression = rng.normal(0, EXPRESSION_NOISE, n_exp)
    active = rng.choice(n_exp, rng.integers(MAX_ACTIVE_EXPRESSIONS + 1), replace=False)
    expression[active] += rng.uniform(0.4, 1.5, len(active))
    direction = rng.standard_normal(3)
    direction[2] = abs(direction[2]) + 0.3  # mostly from the camera's side
    direction /= np.linalg.norm(direction)
    light = np.zeros((9, 3))
    light[0] = rng.uniform(*LIGHT_DC) * (1 + rng.normal(0, 0.05, 3))
    light[1:4] = rng.uniform(*LIGHT_DIRECTIONAL) * direction[:, None] * (1 + rng.normal(0, 0.05, 3))
    light[4:] = rng.normal(0, LIGHT_SECOND_ORDER_STD, (5, 3))
    cam = np.array([CAM_SCALE * (1 + rng.uniform(-CAM_JITTER_SCALE, CAM_JITTER_SCALE)),
                    rng.uniform(-CAM_JITTER_SHIFT, CAM_JITTER_SHIFT),
                    CAM_TY + rng.uniform(-CAM_JITTER_SHIFT, CAM_JITTER_SHIFT)])
    return {"expression": expression, "pose": pose, "light": light, "cam": cam}


def _stack(dicts):
    return {key: torch.as_tensor(np.stack([d[key] for d in dicts]), dtype=torch.float32)
            for key in dicts[0]}


# ---------------------------------------------------------------------------------------------
# Rendering (torch, batched)
# ---------------------------------------------------------------------------------------------

def _strand_pattern():
    """A fixed (T, T) brightness pattern of hair strands running down the head (along v)."""
    rng = _rng(0)
    u = np.linspace(0, 1, TEXTURE, endpoint=False)
    waves = sum(a * np.sin(2 * np.pi * (f * u + p)) for a, f, p in
                zip(rng.uniform(0.02, 0.06, 12), rng.integers(20, 90, 12), rng.uniform(0, 1, 12)))
    return torch.as_tensor(np.tile(0.85 + waves, (TEXTURE, 1)), dtype=torch.float32)


def clothes_texture(clothes, size=TEXTURE):
    """(B, 3, T, T) fabric: solid, horizontal or vertical stripes, checks or dots in two colours."""
    v, u = torch.meshgrid(torch.linspace(1, 0, size), torch.linspace(0, 1, size), indexing="ij")
    freq = clothes[:, 7, None, None]  # (B, 1, 1)
    sharp = 6.0  # tanh sharpness of pattern edges
    patterns = torch.stack([
        torch.ones_like(freq * u),
        torch.tanh(sharp * torch.sin(2 * math.pi * freq * v)),
        torch.tanh(sharp * torch.sin(4 * math.pi * freq * u)),
        torch.tanh(sharp * torch.sin(4 * math.pi * freq * u) * torch.sin(2 * math.pi * freq * v)),
        1 - 2 * (torch.sin(4 * math.pi * freq * u) * torch.sin(2 * math.pi * freq * v) > 0.7),
    ], 1)  # (B, 5, T, T) in [-1, 1]; +1 picks colour one
    choice = F.one_hot(clothes[:, 6].long(), 5).to(patterns.dtype)  # (B, 5)
    weight = 0.5 + 0.5 * torch.einsum("bp,bphw->bhw", choice, patterns)  # (B, T, T)
    c1, c2 = clothes[:, 0:3, None, None], clothes[:, 3:6, None, None]  # (B, 3, 1, 1)
    return c2 + (c1 - c2) * weight[:, None]


def background_image(background, size):
    """(B, 3, H, W) backdrop: a two-colour gradient, plain, striped or with soft blobs."""
    y, x = torch.meshgrid(torch.linspace(1, -1, size), torch.linspace(-1, 1, size), indexing="ij")
    c1, c2 = background[:, 0:3, None, None], background[:, 3:6, None, None]
    angle, pattern, freq, phase = background[:, 6:10].T[..., None, None]  # (B, 1, 1) each
    along = x * torch.cos(angle) + y * torch.sin(angle)  # (B, H, W)
    image = c1 + (c2 - c1) * (0.5 + 0.35 * along)[:, None]
    stripes = 0.1 * torch.sin(math.pi * freq * along + phase)
    blobs = background[:, 10:].reshape(-1, 3, 3)  # (B, 3 blobs, [x, y, radius])
    dist2 = (x[None, None] - blobs[..., 0, None, None]) ** 2 + (
        y[None, None] - blobs[..., 1, None, None]) ** 2  # (B, 3, H, W)
    glow = 0.25 * torch.exp(-dist2 / blobs[..., 2, None, None] ** 2).sum(1)  # (B, H, W)
    image = image + ((pattern == 1) * stripes)[:, None] + ((pattern == 2) * glow)[:, None] * (
        1 - c1)
    return image.clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

PARAM_KEYS = ("shape", "expression", "pose", "pose6", "albedo", "light", "cam")


class SyntheticPortraits(Dataset):
    """Deterministic synthetic portrait pairs with exact ground truth (map-style dataset).

    Parameters
    ----------
    size : image side in pixels (8 to 1024).
    split : "train": item i is two frames (source, query) of identity i mod `identities`.
        "test": item i is a cross-identity pair — source of identity A, query of identity B, both
        from ids disjoint from training — plus `target`, A rendered exactly with B's frame.
    seed : changes every identity and frame.
    length : number of items (default 100,000 train / 1,000 test).
    identities : how many training identities items cycle through (at most 100,000).

    Items: source, query (3, H, W) in [-1, 1]; source_regions, query_regions (H, W) long
    (0 background, 1 clothes, 2 hair, 3 face); source_params, query_params: dicts of shape β,
    expression ψ, pose (FLAME's 15), pose6 (DECA's global + jaw), albedo α, light (9, 3),
    cam [s, tx, ty]; identity (int; test items also query_identity, target, target_regions).
    A DataLoader batches through `__getitems__`, which renders the whole batch at once.
    """

    def __init__(self, size=64, split="train", seed=0, length=None, identities=TRAIN_IDENTITIES):
        if split not in DEFAULT_LENGTH:
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        if not isinstance(size, int) or not 8 <= size <= 1024:
            raise ValueError(f"size={size!r}: expected an int from 8 to 1024")
        self.size, self.split, self.seed = size, split, int(seed)
        self.length = DEFAULT_LENGTH[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length={length}: expected at least 1")
        if not 1 <= identities <= TRAIN_IDENTITIES:
            raise ValueError(f"identities={identities}: expected 1 to {TRAIN_IDENTITIES}")
        self.identities = int(identities)
        self.renderer = PortraitRenderer(FLAME())
        self._split_code = ("train", "test").index(split)

    def __len__(self):
        return self.length

    def identity_ids(self, index):
        """(source identity, query identity) of item `index`."""
        if self.split == "train":
            return index % self.identities, index % self.identities
        return TEST_ID_OFFSET + 2 * index, TEST_ID_OFFSET + 2 * index + 1

    def identity(self, identity_id):
        """The identity's parameters (numpy dict, see `sample_identity`)."""
        flame = self.renderer.flame
        return sample_identity(_rng(self.seed, identity_id), flame.n_shape, flame.n_albedo)

    def frame(self, index, slot):
        """Frame `slot` (0 source, 1 query) of item `index` (numpy dict, see `sample_frame`)."""
        return sample_frame(_rng(self.seed, self._split_code, index, slot),
                            self.renderer.flame.n_exp)

    def render(self, identities, frames):
        """Renders lists of identity and frame dicts (numpy) → images, regions (see
        PortraitRenderer)."""
        with torch.no_grad():
            return self.renderer(_stack(identities), _stack(frames), self.size)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        indices = [self._check_index(i) for i in indices]
        ids = [self.identity_ids(i) for i in indices]
        sources = [self.identity(a) for a, _ in ids]
        queries = sources if self.split == "train" else [self.identity(b) for _, b in ids]
        source_frames = [self.frame(i, 0) for i in indices]
        query_frames = [self.frame(i, 1) for i in indices]
        identities, frames = sources + queries, source_frames + query_frames
        if self.split == "test":  # the ground truth: A with B's frame
            identities, frames = identities + sources, frames + query_frames
        images, regions = self.render(identities, frames)
        n = len(indices)
        items = []
        for k, (a, b) in enumerate(ids):
            item = {"source": images[k], "query": images[n + k],
                    "source_regions": regions[k], "query_regions": regions[n + k],
                    "source_params": _params(sources[k], source_frames[k]),
                    "query_params": _params(queries[k], query_frames[k]), "identity": a}
            if self.split == "test":
                item.update(target=images[2 * n + k], target_regions=regions[2 * n + k],
                            query_identity=b)
            items.append(item)
        return items

    def _check_index(self, index):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return index % self.length


def _params(identity, frame):
    """The coefficients of one rendered image, in the names the rest of the project uses."""
    pose6 = flame15_to_pose6(torch.as_tensor(frame["pose"])[None])[0]
    values = {"shape": identity["shape"], "expression": frame["expression"], "pose": frame["pose"],
              "pose6": pose6, "albedo": identity["albedo"], "light": frame["light"],
              "cam": frame["cam"]}
    return {key: torch.as_tensor(values[key], dtype=torch.float32) for key in PARAM_KEYS}
