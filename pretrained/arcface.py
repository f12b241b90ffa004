"""ArcFace's iResNet-100 as the identity encoder.

ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR
2019, §4.1) embeds a face with a ResNet (He et al. 2016) of its "improved residual unit",
BN - conv - BN - PReLU - conv - BN, a 3×3 stride-1 stem for 112-px faces (input setting "L") and
the output block "E", BN - Dropout - FC - BN, which keeps the map's layout instead of pooling it:

    block:  y = BN_3(conv3×3_s(PReLU(BN_2(conv3×3(BN_1(x)))))) + x',  x' = BN(conv1×1_s(x))
    f_id  = normalize(BN_1d(W · flatten(BN(body(I))) + b)) ∈ S^511,   I ∈ [−1, 1]^{3×112×112}

with body = 4 stages of 3, 13, 30, 3 blocks (iResNet-100), each starting with a stride-2 block:
112 → 56 → 28 → 14 → 7. The embedding is compared by cosine (estimator.csim), so it is used
L2-normalised; Dropout is the identity at inference and has no weights.

Input: ArcFace takes faces aligned to 112 × 112 by five landmarks, RGB as (pixel / 255 − 0.5) /
0.5, i.e. in [−1, 1], the project's range. forward resizes the image (B, 3, H, W) to 112
(bilinear, antialiased); the alignment is the caller's.

The file: insightface's arcface_torch (recognition/arcface_torch) saves the backbone's state dict
alone as `backbone.pth`: conv1, bn1, prelu; layer1.0.bn1, .conv1, .bn2, .prelu, .conv2, .bn3,
the first block's shortcut as downsample.0 (conv) / downsample.1 (BN); ... layer4.2; bn2; fc
(25088 → 512); features (the BatchNorm1d).

Letters: B batch, C channels, S side.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrained import Fixed, read_state

INPUT_SIZE = 112   # ArcFace's aligned face
EMBEDDING_DIM = 512
OUT_SIDE = 7       # 112 / 2^4
WHAT = "arcface_torch's iresnet100 backbone.pth"


class IBasicBlock(nn.Module):
    """iResNet's block (equation above): (B, C_in, S, S) -> (B, C, S/s, S/s). The shortcut is a
    1×1 conv + BN where the shape changes (every stage's first block)."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride,
                                                      bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        h = self.conv1(self.bn1(x))  # (B, C, S, S)
        h = self.bn3(self.conv2(self.prelu(self.bn2(h))))  # (B, C, S/s, S/s)
        return h + (x if self.downsample is None else self.downsample(x))


class IResNet100(nn.Module):
    """iResNet-100 up to the embedding before its normalisation: (B, 3, 112, 112) -> (B, 512).
    Stages of 3, 13, 30, 3 blocks, 64, 128, 256, 512 channels, each halving the side."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._stage(64, 64, 3)
        self.layer2 = self._stage(64, 128, 13)
        self.layer3 = self._stage(128, 256, 30)
        self.layer4 = self._stage(256, 512, 3)
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * OUT_SIDE * OUT_SIDE, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM)

    @staticmethod
    def _stage(in_channels, channels, blocks):
        return nn.Sequential(IBasicBlock(in_channels, channels, 2),
                             *(IBasicBlock(channels, channels, 1) for _ in range(blocks - 1)))

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        x = self.layer2(self.layer1(x))  # (B, 64, 56, 56), then (B, 128, 28, 28)
        x = self.layer4(self.layer3(x))  # (B, 256, 14, 14), then (B, 512, 7, 7)
        x = torch.flatten(self.bn2(x), 1)  # (B, 25088), channel-major as the file's fc
        return self.features(self.fc(x))  # (B, 512)


class ArcFaceIdentity(Fixed):
    """ArcFace with the identity encoder's interface: forward(images (B, 3, H, W) in [-1, 1])
    -> f_id (B, 512), unit L2 norm. load_arcface makes one."""

    def __init__(self):
        super().__init__()
        self.network = IResNet100()

    def forward(self, images):
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)  # (B, 3, 112, 112)
        return F.normalize(self.network(x), dim=1)  # (B, 512)


def load_arcface(path):
    """ArcFace's iResNet-100 from arcface_torch's `backbone.pth`, loaded strictly and fixed
    (pretrained.Fixed); WeightsError (one line) for a file that is not that network's."""
    state = read_state(path, WHAT)
    with torch.device("meta"):  # the file's weights replace these (Fixed.load)
        identity = ArcFaceIdentity()
    return identity.load(state, path, WHAT, identity.network)
