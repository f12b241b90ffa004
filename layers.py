"""Building blocks shared by every network, and the one order of regions and slot tokens.

Regions: every pixel of a portrait belongs to one of four regions, and slot k of the region
encoder is the token of region k (DiffFAE §4.2: face, hair, clothes and background tokens).
The synthetic data labels pixels with the same indices, so slot k, region k, mask k and colour k
always mean the same thing.
"""
import torch

REGION_NAMES = ("face", "hair", "clothes", "background")
FACE, HAIR, CLOTHES, BACKGROUND = range(len(REGION_NAMES))
# One colour per region (then four more, for the 8-slot ablation), used by every picture.
REGION_COLOURS = torch.tensor([[0.95, 0.3, 0.3], [0.95, 0.75, 0.1], [0.1, 0.35, 0.95],
                               [0.2, 0.8, 0.3], [0.8, 0.3, 0.9], [0.3, 0.9, 0.9],
                               [0.6, 0.6, 0.6], [0.9, 0.5, 0.2]])
