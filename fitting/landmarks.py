"""2D landmarks: FLAME vertices found in the image, so that the fit can put I_R on the face.

DECA (Feng et al., SIGGRAPH 2021, Eq. 7) fits its reading to 2D landmarks from a separate
detector (FAN, Bulat & Tzimiropoulos 2017): FLAME's landmark points, projected by the camera,
should land on the detected ones. Here the detector is trained with the estimator on synthetic
portraits, whose landmarks are exact: the chosen vertices of the true mesh, projected.

The landmarks are K vertices of the head's front (landmark_vertices): farthest-point sampling
(Eldar et al. 1997) from the nose tip over the vertices whose normal faces the camera in the
template, leaving out the neck (the vertices the root joint moves most, hidden by the clothes)
and what lies more than FOREHEAD_LIMIT above the nose tip (under a fringe). Left in, those ten
of 68 were found 5–12 px off, the others 1 px (docs/fitting.md).

LandmarkDetector: a small U-Net (Ronneberger et al. 2015) of pre-activation residual blocks
draws one heatmap per landmark at half the image's side; a softmax over each map and its
expectation give the landmark's position (integral regression, Sun et al. 2018), to a fraction
of a pixel and differentiable, trained by the L1 distance to the true positions:

    p_k = Σ_ij softmax(h_k)_ij · (x_j, y_i),   x_j = (j + ½)·S/s  (pixel centres, s = S/2)

Shape letters: B batch, K landmarks, S image side, s heatmap side, C channels, V vertices.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from flame import lbs, pose6_to_flame15
from render import project, vertex_normals

FRONT_FACING = 0.5   # cos of the largest angle between a landmark's normal and the view axis
FOREHEAD_LIMIT = 0.08  # metres above the nose tip: the brows of the built-in head
ROOT_JOINT = 0  # FLAME's global joint: the vertices it moves most are the neck's


def landmark_vertices(flame, k):
    """Indices (k,) of the landmark vertices of `flame`'s template (module docstring)."""
    v = flame.v_template  # (V, 3)
    normals = vertex_normals(v[None], flame.faces)[0]  # (V, 3)
    nose = int(v[:, 2].argmax())
    candidates = torch.nonzero((normals[:, 2] > FRONT_FACING)
                               & (flame.weights.argmax(1) != ROOT_JOINT)
                               & (v[:, 1] < v[nose, 1] + FOREHEAD_LIMIT))[:, 0]
    assert len(candidates) >= k, f"{len(candidates)} candidate vertices for {k} landmarks"
    chosen = [nose] if k else []
    distance = (v[candidates] - v[nose]).norm(dim=1)  # to the nearest chosen vertex
    for _ in range(k - 1):
        far = candidates[distance.argmax()]
        chosen.append(int(far))
        distance = torch.minimum(distance, (v[candidates] - v[far]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long)


class LandmarkMesh:
    """FLAME's vertices `vertex_ids` (K,) alone, placed as flame.FLAME places them (to rounding)
    at a fraction of the cost: the fit's landmark steps need K of the mesh's V vertices.

    Linear blend skinning (flame.lbs) reads the whole mesh only to regress the joints,
    J·(T̄ + Σ_k S_k·c_k), which is linear in the coefficients c: J·T̄ and each J·S_k are
    computed once here and carried as J extra points after the K vertices, with a regressor
    that picks exactly them out. lbs then blends and skins K + J points instead of V."""

    def __init__(self, flame, vertex_ids):
        regressor, k = flame.J_regressor, len(vertex_ids)  # (J, V)
        joints, parts = len(regressor), flame.posedirs.shape[0]
        self.parents, self.k = flame.parents, k
        self.template = torch.cat([flame.v_template[vertex_ids], regressor @ flame.v_template])
        self.dirs = torch.cat([flame.blenddirs[vertex_ids],
                               torch.einsum("jv,vck->jck", regressor, flame.blenddirs)])
        posedirs = flame.posedirs.view(parts, -1, 3)[:, vertex_ids]  # the joints take none
        self.posedirs = F.pad(posedirs, (0, 0, 0, joints)).reshape(parts, -1)
        self.regressor = F.pad(torch.eye(joints, device=regressor.device), (k, 0))  # (J, K + J)
        self.weights = F.pad(flame.weights[vertex_ids], (0, 0, 0, joints))  # joints: unskinned

    def project(self, coefficients, image_size):
        """The landmarks of `coefficients` (the estimator's dict) in pixels (B, K, 2), x right,
        y down, as render.project places the mesh."""
        # float32 under autocast too, as in difffae.render_face: bf16 keeps 8 bits, 0.1 px at
        # 30 px
        with torch.autocast(coefficients["shape"].device.type, enabled=False):
            c = {key: value.float() for key, value in coefficients.items()}
            blend = torch.cat([c["shape"], c["expression"]], 1)
            points = lbs(blend, pose6_to_flame15(c["pose"]), self.template, self.dirs,
                         self.posedirs, self.regressor, self.parents, self.weights)[0]
            return project(points[:, :self.k], c["cam"], image_size)[..., :2]


def landmark_term(estimator, flame, images):
    """What fitting.fit.refine takes as `landmarks`: (detected (B, K, 2), locate), where
    locate(coefficients) projects the same K vertices of `flame`, from the estimator's detector;
    None without one (DECA's encoder has none)."""
    detector = getattr(estimator, "landmarks", None)
    if detector is None:
        return None
    with torch.no_grad():  # a fixed target of the fit
        detected = detector(images)
    mesh = LandmarkMesh(flame, landmark_vertices(flame, detected.shape[1]))
    return detected, lambda c: mesh.project(c, images.shape[-1])


class LandmarkDetector(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> landmarks (B, K, 2) in pixels (module docstring).

    A stride-2 stem to s = S/2, then levels of width base·mult at s, s/2, s/4, ... (two residual
    blocks down, one up after joining the skip), a heatmap per landmark at s: cfg (an
    EstimatorConfig) gives K = n_landmarks, the widths landmark_channels·landmark_mult and the
    groups. Landmark k is vertex landmark_vertices(flame, K)[k].
    """

    def __init__(self, cfg):
        super().__init__()
        from estimator import ResidualBlock  # imported here: estimator.py imports this file
        widths = [cfg.landmark_channels * m for m in cfg.landmark_mult]
        groups = cfg.norm_groups
        self.stem = nn.Conv2d(cfg.in_channels, widths[0], 4, stride=2, padding=1)
        self.first = ResidualBlock(widths[0], widths[0], 1, groups)
        self.down = nn.ModuleList(
            nn.Sequential(ResidualBlock(w_in, w, 2, groups), ResidualBlock(w, w, 1, groups))
            for w_in, w in zip(widths, widths[1:]))
        self.up = nn.ModuleList(ResidualBlock(w + w_skip, w_skip, 1, groups)
                                for w, w_skip in zip(widths[:0:-1], widths[-2::-1]))
        self.norm = nn.GroupNorm(groups, widths[0])
        self.heatmaps = nn.Conv2d(widths[0], cfg.n_landmarks, 3, padding=1)
        side = cfg.image_size // 2  # the stem's output side
        # the centres of the heatmap's cells, in image pixels
        self.register_buffer("centres", (torch.arange(side) + 0.5) * (cfg.image_size / side),
                             persistent=False)

    def forward(self, image):
        h = self.first(self.stem(image))  # (B, C, s, s)
        skips = []
        for level in self.down:
            skips.append(h)
            h = level(h)
        for level in self.up:
            skip = skips.pop()
            h = level(torch.cat([F.interpolate(h, size=skip.shape[-2:]), skip], dim=1))
        return soft_argmax(self.heatmaps(F.relu(self.norm(h))), self.centres)


def soft_argmax(logits, centres):
    """Expected positions (B, K, 2) [x, y] under softmax(logits) over each map of logits
    (B, K, s, s), whose cells have centres `centres` (s,) along each axis."""
    p = logits.float().flatten(2).softmax(-1).view_as(logits)  # (B, K, s, s), float32
    x = (p.sum(2) * centres).sum(-1)  # (B, K): over the columns' marginal
    y = (p.sum(3) * centres).sum(-1)  # (B, K): over the rows' marginal
    return torch.stack([x, y], dim=-1)
