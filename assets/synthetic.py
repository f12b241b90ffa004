"""Synthetic portraits with exact ground truth: the project's built-in training and test data.

DiffFAE trains on two frames of one person (VoxCeleb1, paper §5.1), a source I_S and a query I_Q
that share identity, hair, clothes and background but differ in pose, expression and lighting.
This module renders such pairs from the built-in head (head.py) with render.py, knowing every
generating coefficient and, for cross-identity test pairs, the exact ground-truth edit.

A scene is three meshes in one z-buffer, lit by one SH light, over a backdrop; every pixel is
labelled with its region (layers.py: 0 face, 1 hair, 2 clothes, 3 background):
- the FLAME head (skin, eyes and mouth → face), posed by the frame's FLAME pose;
- a hair shell (→ hair) a style-dependent distance outside the shaped skull (inside it where no
  hair grows, so it hides), with optional long hair falling behind the ears as a capped cylinder;
  it rides rigidly on the neck joint, so turning the head changes what hair shows and occludes;
- a torso (→ clothes): a super-ellipsoid under the neck with a patterned UV texture;
- an unlit backdrop (→ background): a two-colour gradient, plain, striped or with soft blobs.

Sampling (U uniform, N(μ, σ) normal; metres, radians unless in °; colours RGB in [0, 1]).
An identity (`sample_identity`, seeded by its id), a dict of float arrays:
- shape β (n_shape,) ~ N(0, 1) clipped to ±2.5; albedo α (n_albedo,) ~ N(0, 0.8), but its
  dark-skin component U(−1.2, 2.8), for many skin tones;
- hair (8,) = [colour (3): one of six × U(0.85, 1.15) per channel; lowest θ with hair at the
  front U(52°, 70°), side U(88°, 106°), back U(115°, 170°); thickness U(0.008, 0.03);
  long-hair radius U(0.085, 0.1)];
- clothes (10,) = [two colours (3 + 3) U(0.05, 0.95); pattern, one of five; frequency U(3, 8);
  width scale U(0.9, 1.15); top y, TORSO_TOP + U(±0.012)];
- background (19,) = [two colours (3 + 3) U(0.1, 0.9); gradient angle U(0, 2π); pattern, one
  of three; stripe frequency U(2, 6); phase U(0, 2π); 3 × blob (x, y U(±1), radius U(0.2, 0.6))].
A frame (`sample_frame`, seeded by item and slot):
- pose (15,), FLAME's [global, neck, jaw, left eye, right eye] axis-angles: yaw U(±40°), pitch
  U(±15°), roll U(±10°); jaw opening N(0.05, 0.12) clipped to [0, 0.4]; the same gaze for both
  eyes, yaw and pitch N(0, 0.12);
- expression ψ (n_exp,) ~ N(0, 0.15), plus U(0.4, 1.5) on 0 to 2 random components;
- light (9, 3) SH coefficients: DC U(2.6, 3.4) (c0·DC ≈ 0.85 shading, DECA's units), first
  order U(0.4, 1) along a random direction from the camera's side, both × (1 + N(0, 0.05)) per
  channel; second order N(0, 0.08);
- cam (3,) = DECA's [s, tx, ty]: s = 7.8 · (1 + U(±0.05)) shows 0.26 m of height; tx U(±0.015);
  ty 0.055 + U(±0.015) centres the view 5.5 cm below the eyes. Framed like VoxCeleb's crops, the
  face covers about 37 % of the picture, the hair 17 %, the clothes 12 %.
A clip (`trajectory`, `SyntheticPortraits.clip`): a held-out person B moves smoothly through
CLIP_KEYFRAMES frames drawn as above, under a fixed camera; the exact target of each frame is
the source person A rendered in it: what a portrait driven by the clip should be.

Letters: B batch, N frames of a clip, V vertices, F faces, H/W image size, T texture size.
"""
import argparse
import contextlib
import json
import math
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from assets import head
from runtime.guard import write_atomic
from runtime.images import save_image
from flame import FLAME, flame15_to_pose6
from assets.head_surface import (capped_cylinder_radius, direction, grid_angles, latlong_faces,
                          smoothstep)
from layers import BACKGROUND, CLOTHES, FACE, HAIR, REGION_COLOURS
from render import interpolate, project, rasterize, sample_texture, sh_shading, vertex_normals

# Bump whenever a change alters the rendered images: cached pools are named by it.
DATA_VERSION = 3
TEST_ID_OFFSET = 10 ** 6       # test identities are drawn from ids disjoint from training's
TRAIN_IDENTITIES = 100_000
DEFAULT_LENGTH = {"train": 100_000, "test": 1000}
PARAM_KEYS = ("shape", "expression", "pose", "pose6", "albedo", "light", "cam")

HAIR_COLOURS = ((0.05, 0.04, 0.035), (0.18, 0.11, 0.07), (0.35, 0.22, 0.12), (0.45, 0.2, 0.08),
                (0.75, 0.6, 0.35), (0.6, 0.58, 0.55))
HAIR_HIDDEN = -0.025           # where no hair grows the shell lies this far inside the skull
HAIR_GRID_STRIDE = 4           # the hair shell takes every 4th fine row / column of the skin grid
# Torso super-ellipsoid (metres), centred under the neck; exponent > 2 squares the shoulders.
TORSO_SEMI_AXES = (0.22, 0.13, 0.11)
TORSO_TOP, TORSO_Z, TORSO_EXPONENT, SHOULDER_DROP = -0.14, -0.02, 2.6, 0.06
TORSO_ROWS, TORSO_COLS = 18, 32
TEXTURE = 64                   # size of the hair and clothes textures
CAM_SCALE, CAM_DROP = 7.8, 0.055  # the camera's mean s and ty (module docstring)
CLIP_KEYFRAMES = 3              # the driving person's frames a synthetic clip moves through
CLIP_CODE = 2                   # seeds a clip's trajectory apart from the pairs' frames (0, 1)


# ---------------------------------------------------------------------------------------------
# Sampling identities and frames (numpy, seeded: identical on every machine)
# ---------------------------------------------------------------------------------------------

def _rng(*key):
    """A numpy generator seeded by integers: the same numbers on every machine (PCG64)."""
    return np.random.default_rng([int(k) for k in key])


def sample_identity(rng, n_shape, n_albedo):
    """What stays fixed for a person: shape, albedo, hair, clothes, backdrop (module docstring)."""
    shape = np.clip(rng.standard_normal(n_shape), -2.5, 2.5)
    albedo = 0.8 * rng.standard_normal(n_albedo)
    albedo[head.ALBEDO_NAMES.index("skin_dark")] = rng.uniform(-1.2, 2.8)
    colour = np.array(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]) * rng.uniform(0.85, 1.15, 3)
    hair = np.concatenate([np.clip(colour, 0, 1), [rng.uniform(52, 70), rng.uniform(88, 106),
                                                   rng.uniform(115, 170), rng.uniform(0.008, 0.03),
                                                   rng.uniform(0.085, 0.1)]])
    clothes = np.concatenate([rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3),
                              [rng.integers(5), rng.uniform(3, 8), rng.uniform(0.9, 1.15),
                               TORSO_TOP + rng.uniform(-0.012, 0.012)]])
    background = np.concatenate([rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3),
                                 [rng.uniform(0, 2 * np.pi), rng.integers(3), rng.uniform(2, 6),
                                  rng.uniform(0, 2 * np.pi)],
                                 np.stack([rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3),
                                           rng.uniform(0.2, 0.6, 3)], 1).ravel()])
    return dict(shape=shape, albedo=albedo, hair=hair, clothes=clothes, background=background)


# The ranges of a frame's head angles (± degrees, uniform) and jaw opening (radians): an edit by
# numbers outside them asks a model trained on these portraits for a face it never saw.
HEAD_ANGLES = {"yaw": 40, "pitch": 15, "roll": 10}
JAW_MAX = 0.4
# The same as sample.py --set's numbers (degrees), with the expression values' (about ±3σ of
# their spread, the one to three active ones raised by up to 1.5)
NUMBER_RANGES = {**{name: (-limit, limit) for name, limit in HEAD_ANGLES.items()},
                 "jaw": (0, math.degrees(JAW_MAX)),
                 **{name: (-0.5, 2.0) for name in head.EXPRESSION_NAMES}}


def sample_frame(rng, n_exp):
    """What changes between frames: pose, expression, light, camera (module docstring)."""
    yaw, pitch, roll = (rng.uniform(-m, m) for m in map(math.radians, HEAD_ANGLES.values()))
    pose = np.zeros(15)
    pose[:3] = Rotation.from_euler("YXZ", [yaw, pitch, roll]).as_rotvec()
    pose[6] = np.clip(rng.normal(0.05, 0.12), 0, JAW_MAX)  # jaw
    pose[9:12] = pose[12:15] = Rotation.from_euler("YX", rng.normal(0, 0.12, 2)).as_rotvec()
    expression = rng.normal(0, 0.15, n_exp)
    active = rng.choice(n_exp, rng.integers(3), replace=False)
    expression[active] += rng.uniform(0.4, 1.5, len(active))
    direction = rng.standard_normal(3)
    direction[2] = abs(direction[2]) + 0.3  # mostly from the camera's side
    direction /= np.linalg.norm(direction)
    light = np.zeros((9, 3))
    light[0] = rng.uniform(2.6, 3.4) * (1 + rng.normal(0, 0.05, 3))
    light[1:4] = rng.uniform(0.4, 1.0) * direction[:, None] * (1 + rng.normal(0, 0.05, 3))
    light[4:] = rng.normal(0, 0.08, (5, 3))
    cam = np.array([CAM_SCALE * (1 + rng.uniform(-0.05, 0.05)), rng.uniform(-0.015, 0.015),
                    CAM_DROP + rng.uniform(-0.015, 0.015)])
    return {"expression": expression, "pose": pose, "light": light, "cam": cam}


def trajectory(rng, n_exp, length, keyframes=CLIP_KEYFRAMES):
    """A smooth motion of `length` frames: `keyframes` frames of sample_frame, and between
    keyframes a and b the frame a + s(u)·(b − a), u in [0, 1] the position between them and
    s(u) = 3u² − 2u³ (smoothstep: no jump in position or speed at a keyframe). The pose is
    interpolated as rotation vectors, close to the rotation between them for the angles
    sample_frame draws; the camera stays at the first keyframe's, as a camera on a tripod."""
    assert length >= 2 and keyframes >= 2, (length, keyframes)
    keys = [sample_frame(rng, n_exp) for _ in range(keyframes)]
    frames = []
    for k in range(length):
        position = k * (keyframes - 1) / (length - 1)  # in keyframes, 0 .. keyframes − 1
        a = min(int(position), keyframes - 2)
        u = position - a
        s = u * u * (3 - 2 * u)
        frame = {key: keys[a][key] + s * (keys[a + 1][key] - keys[a][key]) for key in keys[a]}
        frames.append({**frame, "cam": keys[0]["cam"]})
    return frames


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


def _grid_uv(corners, n_rows, n_cols):
    """Per-corner UVs of a latitude-longitude grid: u along the columns, v from 1 down to 0."""
    return np.stack([corners[..., 1] / n_cols, 1 - corners[..., 0] / (n_rows - 1)], -1)


class PortraitRenderer:
    """Renders scenes (head, hair, torso, backdrop) from identity and frame parameters; holds
    the fixed topology of the three meshes and what ties the hair shell to the skin."""

    def __init__(self, flame):
        self.flame = flame
        # the hair shell's grid: the skin's, thinned in its fine band (head_surface.THETA_SPANS)
        rows, cols = head.skin_grid()  # θ (R,), φ (C,) in degrees
        fine_rows = (rows >= 72) & (rows < 152)
        fine_cols = np.abs(cols) < 66
        keep_r = np.flatnonzero(~fine_rows | (np.cumsum(fine_rows) % HAIR_GRID_STRIDE == 1))
        keep_c = np.flatnonzero(~fine_cols | (np.cumsum(fine_cols) % HAIR_GRID_STRIDE == 1))
        hair_faces, hair_corners = latlong_faces(len(keep_r), len(keep_c))
        # the skin vertex under each hair vertex: the two poles and the kept grid points
        ring_index = 1 + (keep_r[1:-1, None] - 1) * len(cols) + keep_c[None, :]  # (R'-2, C')
        n_skin = 2 + (len(rows) - 2) * len(cols)
        self.hair_skin = torch.as_tensor(np.concatenate([[0], ring_index.ravel(), [n_skin - 1]]))
        self.hair_theta, self.hair_phi = grid_angles(rows[keep_r], cols[keep_c])  # (Vh,)
        torso_faces, torso_corners = latlong_faces(TORSO_ROWS, TORSO_COLS)
        t_theta, t_phi = grid_angles(np.linspace(0, 180, TORSO_ROWS),
                                          np.linspace(-180, 180, TORSO_COLS, endpoint=False))
        self.torso_direction = direction(t_theta, t_phi)  # (Vt, 3)
        # the three meshes as one: faces, per-corner UVs and the region of every face
        n_head, n_hair = flame.v_template.shape[0], len(self.hair_theta)
        self.faces = torch.as_tensor(np.concatenate([
            flame.faces.numpy(), hair_faces + n_head, torso_faces + n_head + n_hair]))
        self.face_uvs = torch.as_tensor(np.concatenate([
            flame.face_uvs.numpy(), _grid_uv(hair_corners, len(keep_r), len(keep_c)),
            _grid_uv(torso_corners, TORSO_ROWS, TORSO_COLS)]), dtype=torch.float32)
        self.face_part = torch.as_tensor(np.repeat(
            [FACE, HAIR, CLOTHES], [len(flame.faces), len(hair_faces), len(torso_faces)]))
        self.strands = _strand_pattern()

    def hair_shell(self, skin, hair):
        """Hair vertices (B, Vh, 3) in the rest pose from the shaped skin under them (B, Vh, 3)."""
        theta = torch.as_tensor(self.hair_theta, dtype=skin.dtype)  # (Vh,)
        phi = torch.as_tensor(self.hair_phi, dtype=skin.dtype).abs()
        front, side, back, thickness, long_radius = hair[:, 3:8].T[..., None]  # (B, 1) each
        limit = (front + (side - front) * smoothstep(30, 90, phi)
                 + (back - side) * smoothstep(90, 150, phi))  # (B, Vh) lowest θ with hair
        covered = smoothstep(limit + 3, limit - 3, theta)  # (B, Vh) 1 where hair grows
        radius = skin.norm(dim=-1)  # (B, Vh)
        direction = skin / radius[..., None]
        shell = radius + thickness * covered + HAIR_HIDDEN * (1 - covered)
        # long hair falls from behind the ears as a capped cylinder down to the shoulders
        bottom = -0.02 - 0.2 * smoothstep(125, 170, back)
        curtain = capped_cylinder_radius(direction, long_radius, -0.01, bottom)
        shell = torch.maximum(shell, curtain * covered * smoothstep(85, 110, phi))
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

    def render(self, identity, frame, size):
        """B portraits, H = W = size, from dicts of (B, ...) tensors laid out as `sample_identity` /
        `sample_frame` return them → images (B, 3, H, W) in [-1, 1], regions (B, H, W) long."""
        flame = self.flame
        # 1. the head: FLAME with the person's shape and the frame's expression and pose
        verts, transforms = flame(identity["shape"], frame["expression"], frame["pose"],
                                  return_transforms=True)
        # 2. the hair: a shell over the shaped (not posed) skin, moved rigidly by the neck joint
        shape_dirs = flame.blenddirs[self.hair_skin, :, :flame.n_shape]  # (Vh, 3, n_shape)
        skin = flame.v_template[self.hair_skin] + torch.einsum("vck,bk->bvc", shape_dirs,
                                                               identity["shape"])  # (B, Vh, 3)
        rest = self.hair_shell(skin, identity["hair"])
        neck = transforms[:, 1]  # (B, 4, 4) rest-relative transform of the head
        hair = rest @ neck[:, :3, :3].transpose(1, 2) + neck[:, None, :3, 3]
        # 3. the torso, then one z-buffer for all three closed meshes (back faces are hidden)
        vertices = torch.cat([verts, hair, self.torso(identity["clothes"])], 1)  # (B, V, 3)
        fragments = rasterize(project(vertices, frame["cam"], size), self.faces, size,
                              cull_backfaces=True)
        # 4. regions: the region of the face seen at each pixel, background where none is
        covered = fragments.pix_to_face >= 0  # (B, H, W)
        part = torch.where(covered, self.face_part[fragments.pix_to_face.clamp(min=0)], BACKGROUND)
        # 5. each pixel's normal and UV; albedo: its region's texture (skin, hair, fabric) at UV
        normals = interpolate(vertex_normals(vertices, self.faces), self.faces, fragments)
        normals = F.normalize(normals, dim=-1).permute(0, 3, 1, 2)  # (B, 3, H, W)
        uv = interpolate(self.face_uvs, self.faces, fragments)  # (B, H, W, 2)
        skin_texture = flame.albedo(identity["albedo"])  # (B, 3, T, T)
        hair_texture = identity["hair"][:, :3, None, None] * self.strands  # (B, 3, T, T)
        albedo = torch.zeros_like(normals)
        for region, texture in ((FACE, skin_texture), (HAIR, hair_texture),
                                (CLOTHES, clothes_texture(identity["clothes"]))):
            albedo = torch.where((part == region)[:, None], sample_texture(texture, uv), albedo)
        # 6. shading: albedo × SH irradiance at the interpolated normal, over the unlit backdrop
        foreground = albedo * sh_shading(normals, frame["light"])
        image = torch.where(covered[:, None], foreground,
                            background_image(identity["background"], size))
        return image.clamp(0, 1) * 2 - 1, part


class SyntheticPortraits(Dataset):
    """Deterministic synthetic portrait pairs with exact ground truth (map-style dataset).

    size: image side, 8 to 1024 pixels. split "train": item i is two frames (source, query) of
    identity i mod `identities` (at most 100,000); "test": a source of identity A and a query of
    identity B, both never used in training, plus `target`, A rendered exactly with B's frame.
    seed changes every identity and frame; length defaults to 100,000 train / 1,000 test items.
    Items: source, query (3, H, W) in [-1, 1]; source_regions, query_regions (H, W) long;
    source_params, query_params: dicts of PARAM_KEYS (pose6 is DECA's global + jaw rotation);
    identity (int); test items also query_identity, target and target_regions. A DataLoader
    batches through `__getitems__`, which renders the whole batch at once."""

    def __init__(self, size=64, split="train", seed=0, length=None, identities=TRAIN_IDENTITIES):
        if split not in DEFAULT_LENGTH:
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        if not isinstance(size, int) or not 8 <= size <= 1024:
            raise ValueError(f"size={size!r}: expected an int from 8 to 1024")
        self.size, self.split, self.seed, self.identities = size, split, int(seed), int(identities)
        self.length = DEFAULT_LENGTH[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length={length}: expected at least 1")
        if not 1 <= identities <= TRAIN_IDENTITIES:
            raise ValueError(f"identities={identities}: expected 1 to {TRAIN_IDENTITIES}")
        self.renderer = PortraitRenderer(FLAME())

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
        split_code = ("train", "test").index(self.split)
        return sample_frame(_rng(self.seed, split_code, index, slot), self.renderer.flame.n_exp)

    @torch.no_grad()
    def render(self, identities, frames):
        """Identity and frame dicts (numpy, in lists) → images, regions (see PortraitRenderer)."""
        stack = [{key: torch.as_tensor(np.stack([d[key] for d in dicts]), dtype=torch.float32)
                  for key in dicts[0]} for dicts in (identities, frames)]
        return self.renderer.render(*stack, self.size)

    def clip(self, index, length):
        """A driving clip with exact targets (test split): person B of item `index` moves along
        a `trajectory` of `length` frames; the targets are the source person A in each of those
        frames. Returns source (3, H, W), A in the item's source frame; query, target
        (N, 3, H, W); query_regions, target_regions (N, H, W); frames, the N frame dicts."""
        if self.split != "test":
            raise ValueError("clip: the test split has a driving person (train pairs one)")
        index = range(self.length)[index]  # IndexError when out of range
        a, b = (self.identity(person) for person in self.identity_ids(index))
        frames = trajectory(_rng(self.seed, CLIP_CODE, index), self.renderer.flame.n_exp,
                            length)
        images, regions = self.render([a] + [b] * length + [a] * length,
                                      [self.frame(index, 0)] + frames + frames)
        query, target = slice(1, 1 + length), slice(1 + length, None)
        return {"source": images[0], "query": images[query], "target": images[target],
                "query_regions": regions[query], "target_regions": regions[target],
                "frames": frames}

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        indices = [range(self.length)[i] for i in indices]  # IndexError when out of range
        ids = [self.identity_ids(i) for i in indices]
        sources = [self.identity(a) for a, _ in ids]
        queries = sources if self.split == "train" else [self.identity(b) for _, b in ids]
        source_frames, query_frames = ([self.frame(i, slot) for i in indices] for slot in (0, 1))
        # one batch: sources, queries and, for test items, the ground truth (A with B's frame)
        identities, frames = sources + queries, source_frames + query_frames
        if self.split == "test":
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


def true_coefficients(batch, image):
    """The exact coefficients of batch[image] ("source" or "query") in the estimator's keys."""
    params = batch[f"{image}_params"]
    return {"shape": params["shape"], "albedo": params["albedo"],
            "expression": params["expression"], "pose": params["pose6"], "cam": params["cam"],
            "light": params["light"]}


# ---------------------------------------------------------------------------------------------
# The training pool: pairs rendered once (by parallel processes) and cached on disk
# ---------------------------------------------------------------------------------------------

POOL_CHUNK = 64  # pairs rendered at once: the unit of work, so any number of processes gives
                 # the same bytes
_worker_data = {}


class PairPool(Dataset):
    """Synthetic pairs rendered once and kept as uint8 images and regions, float32 params."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["source"])

    def __getitems__(self, indices):
        """Items shaped like SyntheticPortraits' (images in [-1, 1], regions long, params), with
        "index", the pair's place in the pool (the key of frozen_cache.FrozenCache)."""
        items = []
        for i in indices:
            item = {"identity": int(self.tensors["identity"][i]), "index": i}
            for image in ("source", "query"):
                item[image] = self.tensors[image][i].float() / 127.5 - 1
                item[f"{image}_regions"] = self.tensors[f"{image}_regions"][i].long()
                item[f"{image}_params"] = {key: self.tensors[f"{image}_{key}"][i]
                                           for key in PARAM_KEYS}
            items.append(item)
        return items


def pool_path(folder, size, pairs, identities, seed):
    """Where a pool is cached: named by everything that changes its bytes."""
    return Path(folder) / (f"synthetic-v{DATA_VERSION}-{size}px-{pairs}pairs-{identities}ids-"
                           f"seed{seed}.pt")


def _render_chunk(task):
    """Pairs start..start+POOL_CHUNK of a training split, as uint8 / float32 tensors."""
    size, seed, pairs, identities, start = task
    key = (size, seed, pairs, identities)
    if key not in _worker_data:  # built once per process: FLAME and the renderer's buffers
        _worker_data[key] = SyntheticPortraits(size, "train", seed, length=pairs,
                                               identities=identities)
    data = _worker_data[key]
    batch = default_collate(data.__getitems__(range(start, min(pairs, start + POOL_CHUNK))))
    chunk = {"identity": batch["identity"]}
    for image in ("source", "query"):
        chunk[image] = ((batch[image] + 1) * 127.5).round().to(torch.uint8)
        chunk[f"{image}_regions"] = batch[f"{image}_regions"].to(torch.uint8)
        chunk.update({f"{image}_{key}": batch[f"{image}_params"][key] for key in PARAM_KEYS})
    return chunk


def _one_thread():
    torch.set_num_threads(1)


def _read_chunk(path):
    """A rendered chunk kept by render_pool, or None if it is missing or cannot be read."""
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # missing, truncated, not a torch file: rendered again
        return None


def render_pool(path, size, pairs, identities, seed, workers=0):
    """Renders `pairs` training pairs, saves them atomically at `path` and returns them;
    `workers` > 0 processes share the chunks (one thread each), 0 renders in this process.
    Each chunk is kept in a folder beside `path` as it is rendered, so that a rendering cut
    short (Ctrl-C) goes on from where it stopped; the folder goes once the pool is whole."""
    path = Path(path)
    kept = path.with_name(f"{path.stem}-chunks")
    tasks = [(size, seed, pairs, identities, start) for start in range(0, pairs, POOL_CHUNK)]
    todo = [task for task in tasks if _read_chunk(kept / f"{task[-1]:07d}.pt") is None]
    progress = dict(total=len(tasks), initial=len(tasks) - len(todo), unit="chunk",
                    desc=f"rendering {path.name}")
    with contextlib.ExitStack() as stack:
        if workers and todo:
            context = multiprocessing.get_context("spawn")  # fork and OpenMP threads do not mix
            pool = stack.enter_context(context.Pool(workers, initializer=_one_thread))
            chunks = pool.imap(_render_chunk, todo)
        else:
            chunks = map(_render_chunk, todo)
        for task, chunk in zip(todo, tqdm(chunks, **progress)):
            write_atomic(kept / f"{task[-1]:07d}.pt", lambda file: torch.save(chunk, file))
    chunks = [_read_chunk(kept / f"{task[-1]:07d}.pt") for task in tasks]
    tensors = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    write_atomic(path, lambda file: torch.save(tensors, file))
    shutil.rmtree(kept)
    return tensors


def read_pool(path, pairs):
    """(the pool's tensors, None) if the file at `path` holds a pool of `pairs` pairs, else
    (None, why not: a short phrase)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, unsafe contents
        return None, f"unreadable ({type(error).__name__})"
    expected = {"identity"} | {f"{image}{suffix}" for image in ("source", "query")
                               for suffix in ("", "_regions", *(f"_{k}" for k in PARAM_KEYS))}
    if not isinstance(tensors, dict) or set(tensors) != expected:
        return None, "not a pool of this version (other keys)"
    if any(not torch.is_tensor(t) or len(t) != pairs for t in tensors.values()):
        return None, f"inconsistent (expected {pairs} pairs in every tensor)"
    return tensors, None


def load_pool(folder, size, pairs, identities, seed, workers=0, render=True):
    """The cached training pool in `folder`, rendered first if it is missing, or rendered again,
    with one line saying why, if it cannot be used. With render=False (a process that is not
    the one rendering) it is only read."""
    path = pool_path(folder, size, pairs, identities, seed)
    tensors, problem = read_pool(path, pairs) if path.exists() else (None, "missing")
    if tensors is None and not render:
        raise ValueError(f"{path}: {problem}")
    if tensors is None:
        if problem != "missing":
            print(f"{path}: {problem}; rendering it again", file=sys.stderr)
        tensors = render_pool(path, size, pairs, identities, seed, workers)
    return PairPool(tensors)


def _params(identity, frame):
    """The coefficients of one rendered image, in the names the rest of the project uses."""
    values = {**identity, **frame,
              "pose6": flame15_to_pose6(torch.as_tensor(frame["pose"])[None])[0]}
    return {key: torch.as_tensor(values[key], dtype=torch.float32) for key in PARAM_KEYS}


# -- Command line: export the data set to disk, preview it, write the README's examples --------

OVERLAY_ALPHA = 0.55
EXPORT_BATCH = 32


def export_synthetic(out_dir, n, size, split="train", seed=0):
    """Writes n synthetic items in the vox-png layout, one clip of two frames per item:
    out_dir/<split>/id<identity>#synthetic#<item>#<item>.mp4/0000000.png (source) and
    0000001.png (train: query; test: target, i.e. the source person in the query's frame), plus
    params.json with the generating coefficients of both frames. Returns the clip folders."""
    dataset = SyntheticPortraits(size, split, seed, length=n)
    clips = []
    for start in range(0, n, EXPORT_BATCH):
        batch = dataset.__getitems__(range(start, min(n, start + EXPORT_BATCH)))
        for index, item in enumerate(batch, start):
            name = f"id{item['identity']:07d}#synthetic#{index:06d}#{index:06d}.mp4"
            clip = Path(out_dir) / split / name
            save_image(item["source"], clip / "0000000.png")
            save_image(item["target" if split == "test" else "query"], clip / "0000001.png")
            text = json.dumps({frame: {k: v.tolist() for k, v in item[f"{frame}_params"].items()}
                               for frame in ("source", "query")})
            write_atomic(clip / "params.json", lambda file: file.write(text.encode()))
            clips.append(clip)
    return clips


def export_clip(out_dir, length, size, seed=0, index=0):
    """Writes one synthetic clip (SyntheticPortraits.clip of test item `index`): source.png,
    query/<frame:07d>.png (the driving clip, named as vox-png frames), target/<frame:07d>.png
    (the exact answers) and params.json (the source's coefficients and each frame's).
    Returns the paths of source.png and of the two folders."""
    data = SyntheticPortraits(size, "test", seed, length=index + 1)
    clip = data.clip(index, length)
    out = Path(out_dir)
    save_image(clip["source"], out / "source.png")
    for folder in ("query", "target"):
        for k, image in enumerate(clip[folder]):
            save_image(image, out / folder / f"{k:07d}.png")
    people = [data.identity(person) for person in data.identity_ids(index)]
    params = {"source": _params(people[0], data.frame(index, 0)),
              "query": [_params(people[1], frame) for frame in clip["frames"]],
              "target": [_params(people[0], frame) for frame in clip["frames"]]}
    text = json.dumps(params, default=lambda tensor: tensor.tolist())
    write_atomic(out / "params.json", lambda file: file.write(text.encode()))
    return out / "source.png", out / "query", out / "target"


def preview_grid(size=128, n=6, seed=0):
    """(3, H, W) grid: a row per item — source | query | query regions overlay | target; train
    items first, then test items (whose target is the ground-truth edit)."""
    rows = []
    for split in ("train", "test"):
        for item in SyntheticPortraits(size, split, seed, length=n).__getitems__(range(n)):
            colours = REGION_COLOURS[item["query_regions"]].permute(2, 0, 1) * 2 - 1  # (3, H, W)
            overlay = item["query"] + OVERLAY_ALPHA * (colours - item["query"])
            target = item.get("target", torch.full_like(item["query"], -1.0))
            rows.append(torch.cat([item["source"], item["query"], overlay, target], 2))
    return torch.cat(rows, 1)


def write_examples(out_dir, size, seed=0):
    """The README's example inputs, from held-out test identities: src.png, qry.png (another
    person), target.png (the exact edit: src's person in qry's frame) and other.png (a third
    person, for --swap). Returns the paths written."""
    first, second = SyntheticPortraits(size, "test", seed).__getitems__([0, 1])
    images = {"src": first["source"], "qry": first["query"], "target": first["target"],
              "other": second["source"]}
    paths = [Path(out_dir) / f"{name}.png" for name in images]
    for image, path in zip(images.values(), paths):
        save_image(image, path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export, preview or sample synthetic portraits.")
    parser.add_argument("--export", metavar="DIR", help="write items in the vox-png layout")
    parser.add_argument("--n", type=int, default=1000, help="items to export")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", metavar="PNG", help="write a grid of train and test items")
    parser.add_argument("--examples", metavar="DIR", help="write the README's example inputs")
    parser.add_argument("--export-clip", metavar="DIR", help="write a driving clip with its "
                        "exact targets (test identities)")
    parser.add_argument("--frames", type=int, default=24, help="frames of --export-clip")
    args = parser.parse_args(argv)
    if not (args.export or args.preview or args.examples or args.export_clip):
        parser.error("nothing to do: give --export DIR, --preview PNG, --examples DIR or "
                     "--export-clip DIR")
    try:
        if args.export:
            if args.n < 1:
                raise ValueError(f"--n {args.n}: expected at least 1 item")
            clips = export_synthetic(args.export, args.n, args.size, args.split, args.seed)
            print(f"wrote {len(clips)} clips to {Path(args.export) / args.split}")
        if args.preview:
            save_image(preview_grid(args.size, seed=args.seed), args.preview)
            print(f"wrote {args.preview}")
        if args.examples:
            paths = write_examples(args.examples, args.size, args.seed)
            print("wrote " + ", ".join(str(p) for p in paths))
        if args.export_clip:
            if args.frames < 2:
                raise ValueError(f"--frames {args.frames}: a clip needs at least 2")
            paths = export_clip(args.export_clip, args.frames, args.size, args.seed)
            print(f"wrote {paths[0]} and {args.frames} frames in each of {paths[1]}, {paths[2]}")
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
