"""The identity stage's loss head: ArcFace's additive angular margin (Deng et al., CVPR 2019,
"ArcFace: Additive Angular Margin Loss for Deep Face Recognition", Eq. 3), which trains
estimator.IdentityEncoder to classify the synthetic identities; an edit never uses it.

    cos θ_j = ŵ_j · x̂,   logit_j = s · cos θ_j (j ≠ y),   logit_y = s · cos(θ_y + m)
    cos(θ + m) = cos θ cos m − sin θ sin m,   sin θ = √max(1 − cos²θ, 0)
    for θ_y + m > π (cos θ_y < cos(π − m)) we use cos θ_y − m·sin m instead ("easy_margin=False"
    in the authors' code, deepinsight/insightface recognition/arcface_torch/losses.py): cos(θ + m)
    would rise again on (π − m, π], rewarding a larger angle; the fallback keeps the target logit
    strictly decreasing in θ over [0, π].

Letters: B batch, D embedding size, N classes.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import require

ARCFACE_SCALE = 64.0  # Deng et al. 2019 §4.1
ARCFACE_MARGIN = 0.5  # Deng et al. 2019 §4.1, radians


def _sqrt_zero_safe(x):
    """√x for x ≥ 0 whose gradient at x = 0 is 0 instead of inf (0·inf would give NaN).

    The inner where keeps sqrt's backward away from 0; the outer one selects the exact value.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


class ArcMarginHead(nn.Module):
    """ArcFace additive angular margin logits (Deng et al. 2019, Eq. 3).

    D = embedding_dim, N = n_classes identities; s the feature scale, 64 in the paper (§4.1): with
    few classes a smaller s (e.g. 16-30) avoids a softmax that saturates before the classes
    separate; m the angular margin in radians, 0.5 in the paper, 0 ≤ m < π/2.

    forward(embeddings (B, D), labels (B,) int) -> logits (B, N) for cross-entropy.
    """

    def __init__(self, embedding_dim, n_classes, s=ARCFACE_SCALE, m=ARCFACE_MARGIN):
        super().__init__()
        require(n_classes >= 2, f"ArcMarginHead: n_classes={n_classes}, need >= 2 identities")
        require(s > 0, f"ArcMarginHead: scale s={s}, need > 0")
        require(0 <= m < math.pi / 2, f"ArcMarginHead: margin m={m}, need 0 <= m < pi/2 radians")
        self.s = float(s)
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.cos_threshold = math.cos(math.pi - m)  # cos θ below this means θ + m > π
        self.fallback_margin = m * math.sin(m)  # = m·sin(π − m), the insightface constant

    def forward(self, embeddings, labels):
        n_classes = self.weight.shape[0]
        assert labels.shape == embeddings.shape[:1] and not labels.is_floating_point(), labels.dtype
        labels = labels.long()  # gather and one_hot index with int64
        x = F.normalize(embeddings, dim=1)  # (B, D)
        w = F.normalize(self.weight, dim=1)  # (N, D)
        cos = (x @ w.T).clamp(-1.0, 1.0)  # (B, N); rounding can leave |cos| slightly above 1
        cos_y = cos.gather(1, labels[:, None])  # (B, 1)
        sin_y = _sqrt_zero_safe(1.0 - cos_y * cos_y)  # (B, 1); θ ∈ [0, π] so sin θ ≥ 0
        cos_y_margin = cos_y * self.cos_m - sin_y * self.sin_m  # cos(θ_y + m)
        target = torch.where(cos_y >= self.cos_threshold, cos_y_margin,
                             cos_y - self.fallback_margin)  # (B, 1)
        is_target = F.one_hot(labels, n_classes).bool()  # (B, N)
        return self.s * torch.where(is_target, target, cos)  # (B, N)
