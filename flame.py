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

This file holds the equations only. The model's arrays come from one of two places, through one
code path:
- `assets.flame_files.load_flame(path)` reads FLAME's own files (`generic_model.pkl`, or an `.npz`
  with the same keys) — the file formats, their safe loading and the preview program live there;
- `assets.head.builtin_head()` builds a procedural head in the same format (no licensed file
  needed).

Letters: B batch, V vertices, F faces, J joints (5), K blendshape directions, P pose features (36).
"""
import numpy as np
import torch
import torch.nn as nn
from scipy.spatial.transform import Rotation

from assets.flame_files import check_model, load_flame

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
POSE_DIM = 3 * len(JOINT_NAMES)
FLAME_SHAPE_BASIS = 300  # FLAME's `shapedirs` hold 300 shape, then 100 expression directions
DEFAULT_N_SHAPE, DEFAULT_N_EXP = 100, 50  # the coefficients DECA (Feng et al. 2021) uses
RODRIGUES_EPS = 1e-8  # angle² below which Rodrigues' formula is its Taylor expansion (no 0/0)


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


def head_pose_degrees(pose):
    """(B, 3) yaw, pitch, roll in degrees from FLAME's global axis-angle pose[..., :3]."""
    rotvec = pose[..., :3].detach().double().cpu().numpy().reshape(-1, 3)
    angles = Rotation.from_rotvec(rotvec).as_euler("YXZ", degrees=True)
    return torch.as_tensor(angles)


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
    model : dict from `load_flame` or `builtin_head`, a path to a FLAME file, or None for the
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
            from assets.head import builtin_head
            model = builtin_head()
        elif not isinstance(model, dict):
            model = load_flame(model)
        check_model(model, "FLAME model")
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
