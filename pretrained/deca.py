"""DECA's coarse encoder as the coefficient estimator, and the FLAME its coefficients drive.

DECA (Feng et al., "Learning an Animatable Detailed 3D Face Model from In-The-Wild Images",
SIGGRAPH 2021, §4.1) regresses FLAME's coefficients from a face crop with its coarse encoder
E_c, a ResNet-50 (He et al. 2016) whose pooled features go through a two-layer MLP:

    v = W_2 · ReLU(W_1 · GAP(ResNet-50(I)) + b_1) + b_2,   I ∈ [0, 1]^{3×224×224},  v ∈ R^236

v is split as estimator.CoefficientEstimator.decode splits it, in DECA's order: shape β 100 |
albedo α 50 (DECA: tex) | expression ψ 50 | pose θ 6 = [global 3, jaw 3] axis-angle |
cam c = [s, t_x, t_y] | light l 27 → (9, 3) row-major, l[k, ch] = v[209 + 3k + ch].
They drive FLAME 2020 (Li et al. 2017; the first 100 shape and 50 expression directions, neck
and eyes at rest: flame.pose6_to_flame15) and DECA's albedo space, FLAME_albedo_from_BFM.npz
(assets.flame_files.load_bfm_albedo), through render.py, whose orthographic camera
(x_ndc = s·(x + t), y up) and SH light (9 bands × RGB with DECA's constants c_k) are DECA's.

Input: DECA crops a square of 1.25× the face's bounding box, centred on it, and resizes it to
224 × 224, RGB in [0, 1]. forward takes the image as given (B, 3, H, W) in [−1, 1] (the crop
is the caller's), resizes it to 224 (bilinear, antialiased) and maps it to [0, 1].

The released file `deca_model.tar` is a dict written by torch.save whose "E_flame" entry is the
coarse encoder's state dict (beside the detail encoder and decoder, unused here): the ResNet-50
under `encoder.`, in torchvision's names without its classifier (conv1, bn1, layer1.0.conv1 ...
layer4.2.bn3, a block's projection shortcut under downsample.0 / downsample.1), and the MLP
under `layers.0.` and `layers.2.`. Its average pooling is a 7 × 7 window, the whole map at 224 px:
here a mean over the map.

Letters: B batch, S input side, P a stage's bottleneck width (its output is 4P).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from assets.flame_files import load_bfm_albedo, load_flame, load_obj_uvs
from estimator import CoefficientEstimator, EstimatorConfig
from flame import FLAME
from pretrained import Fixed, read_state

INPUT_SIZE = 224  # DECA's crop side
FEATURES = 2048   # ResNet-50's pooled features
HIDDEN = 1024     # the MLP's hidden width
WHAT = "DECA's deca_model.tar"
# DECA's data folder: the files its coefficients need, beside deca_model.tar
FLAME_FILE, UV_FILE, ALBEDO_FILE = ("generic_model.pkl", "head_template.obj",
                                    "FLAME_albedo_from_BFM.npz")


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (He et al. 2016, Fig. 5 right), the stride on the 3×3 conv as
    torchvision places it: y = ReLU(BN(conv1(ReLU(BN(conv3_s(ReLU(BN(conv1(x))))))) + x'), with
    x' = BN(conv1_s(x)) where the shape changes, else x. (B, C, H, W) -> (B, 4P, H/s, W/s)."""

    def __init__(self, in_channels, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or in_channels != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, 4 * planes, 1, stride,
                                                      bias=False), nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))  # (B, P, H, W)
        h = F.relu(self.bn2(self.conv2(h)))  # (B, P, H/s, W/s)
        h = self.bn3(self.conv3(h))  # (B, 4P, H/s, W/s)
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016, Table 1) without its classifier: (B, 3, S, S) -> (B, 2048),
    the mean of the last stage's map (7 × 7 at S = 224). Stages of 3, 4, 6, 3 blocks."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._stage(64, 64, 3, 1)
        self.layer2 = self._stage(256, 128, 4, 2)
        self.layer3 = self._stage(512, 256, 6, 2)
        self.layer4 = self._stage(1024, 512, 3, 2)

    @staticmethod
    def _stage(in_channels, planes, blocks, stride):
        return nn.Sequential(Bottleneck(in_channels, planes, stride),
                             *(Bottleneck(4 * planes, planes, 1) for _ in range(blocks - 1)))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, S/2, S/2)
        x = F.max_pool2d(x, 3, 2, 1)  # (B, 64, S/4, S/4)
        x = self.layer2(self.layer1(x))  # (B, 256, S/4, S/4), then (B, 512, S/8, S/8)
        x = self.layer4(self.layer3(x))  # (B, 1024, S/16, S/16), then (B, 2048, S/32, S/32)
        return x.mean(dim=(2, 3))  # (B, 2048)


class DecaEstimator(Fixed):
    """DECA's E_flame with the estimator's interface: forward(images (B, 3, H, W) in [-1, 1])
    -> the dict of CoefficientEstimator (shape, albedo, expression, pose (B, 6), cam (B, 3),
    light (B, 9, 3)) in DECA's conventions. load_deca makes one."""

    decode = CoefficientEstimator.decode  # one split of the vector, the stand-in's
    encode = CoefficientEstimator.encode

    def __init__(self):
        super().__init__()
        self.cfg = EstimatorConfig()  # DECA's sizes (P = 236) and crop side (224)
        self.encoder = ResNet50()
        self.layers = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(),
                                    nn.Linear(HIDDEN, self.cfg.n_params))

    def forward(self, images):
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)  # (B, 3, 224, 224)
        vector = self.layers(self.encoder((x + 1) / 2))  # (B, 236), from RGB in [0, 1]
        return self.decode(vector)


def load_deca(path):
    """DECA's coarse encoder from `deca_model.tar`, loaded strictly and fixed (pretrained.Fixed);
    WeightsError (one line) for a file that is not DECA's."""
    state = read_state(path, WHAT, "E_flame")
    with torch.device("meta"):  # the file's weights replace these (Fixed.load)
        deca = DecaEstimator()
    return deca.load(state, path, WHAT)


def load_deca_flame(path):
    """FLAME 2020 with DECA's UVs and albedo space, from the files DECA keeps beside
    `deca_model.tar` (its data folder): generic_model.pkl (FLAME 2020,
    https://flame.is.tue.mpg.de), head_template.obj (DECA's UVs) and FLAME_albedo_from_BFM.npz
    (the BFM_to_FLAME conversion of BFM 2017's colours). A flame.FLAME with DECA's 100 shape,
    50 expression and 50 albedo coefficients; FlameModelError (one line) for a missing or
    unusable file."""
    folder = Path(path).parent
    model = load_flame(folder / FLAME_FILE)
    model["face_uvs"] = load_obj_uvs(folder / UV_FILE, model["faces"])
    model.update(load_bfm_albedo(folder / ALBEDO_FILE, EstimatorConfig.n_albedo))
    return FLAME(model, EstimatorConfig.n_shape, EstimatorConfig.n_exp)
