"""The paper's own estimator and identity encoder, loaded from the files their authors publish.

DiffFAE (Wang et al., ECCV 2024, §4.1-4.2) reads FLAME coefficients off a portrait with DECA
(Feng et al., SIGGRAPH 2021) and an identity token with ArcFace (Deng et al., CVPR 2019).
estimator.py holds stand-ins trained here on synthetic portraits; a user who has the released
weights loads these instead:
- deca.py: DECA's coarse encoder from `deca_model.tar` (a ResNet-50 and a two-layer MLP → 236
  coefficients), and FLAME 2020 with the BFM albedo that those coefficients drive;
- arcface.py: the iResNet-100 of insightface's arcface_torch from `backbone.pth` → f_id (B, 512).

Both are fixed, as the paper keeps them (§4.3: only the UNet and the region encoder train).
Fixed.load turns their weights into non-persistent buffers: they move with the model, no
optimiser sees them, and no checkpoint holds them; a checkpoint names the files instead (as it
leaves FLAME's out) and install() loads them again. The files stay under their authors'
licences: nothing here copies them.

Loading is strict: a file that is missing, not a PyTorch file, the other network's, or whose
weights' names or shapes differ from the published ones is refused with one line naming the file
and the problem (WeightsError), before any long work.
"""
from pathlib import Path

import torch
import torch.nn as nn

COUNTER = "num_batches_tracked"  # BatchNorm's step counter: not a weight, absent in old files
SHOWN = 3  # names quoted in an error


class WeightsError(ValueError):
    """A pretrained network's file that cannot be used: one line naming the file and the
    problem."""


def _some(names):
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


def read_state(path, what, entry=None):
    """The state dict saved in `path` (torch.load with weights_only: the file runs no code), or
    the one under its key `entry` (DECA's "E_flame"). `what` names the expected file in errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (expected {what})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle, zip and unsafe-global errors alike
        raise WeightsError(f"{path}: not a readable PyTorch file (expected {what})") from None
    keys = list(saved) if isinstance(saved, dict) else []
    if entry is not None:
        if not isinstance(saved, dict) or not isinstance(saved.get(entry), dict):
            raise WeightsError(f"{path}: no '{entry}' entry, so not {what} (its entries: "
                               f"{_some(keys) or type(saved).__name__})")
        saved, keys = saved[entry], list(saved[entry])
    if not keys or not all(isinstance(saved[k], torch.Tensor) for k in keys):
        raise WeightsError(f"{path}: not a state dict of tensors, so not {what} (its entries: "
                           f"{_some(keys) or type(saved).__name__})")
    return saved


class Fixed(nn.Module):
    """A published network used as a fixed function: loaded strictly, its weights held as
    non-persistent buffers (moved by .to(), absent from state_dict() and from every optimiser),
    and always in eval mode (BatchNorm's running statistics), whatever train() is asked."""

    def load(self, state, path, what, network=None):
        """Loads `state` into `network` (a child; None: self) if its names and shapes are
        exactly the network's (BatchNorm's counters aside), else one line on what differs; then
        fixes self. Returns self. Build self on the meta device: the file's tensors are used as
        they are, nothing is initialised only to be overwritten."""
        network = self if network is None else network
        expected = {k: v.shape for k, v in network.state_dict().items() if not k.endswith(COUNTER)}
        given = {k: v for k, v in state.items() if not k.endswith(COUNTER)}
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing or unexpected:
            raise WeightsError(f"{path}: not {what}: " + "; ".join(
                f"{len(names)} {kind} weights ({_some(names)})"
                for kind, names in (("missing", missing), ("unexpected", unexpected)) if names))
        for key, shape in expected.items():
            if given[key].shape != shape:
                raise WeightsError(f"{path}: not {what}: '{key}' has shape "
                                   f"{tuple(given[key].shape)}, expected {tuple(shape)}")
        network.load_state_dict({k: v.float() if v.is_floating_point() else v
                                 for k, v in given.items()}, strict=False, assign=True)
        for module in self.modules():
            for name, tensor in [*module.named_parameters(recurse=False),
                                 *module.named_buffers(recurse=False)]:
                delattr(module, name)  # a counter the file left out is still on meta: zero
                tensor = torch.zeros((), dtype=torch.long) if tensor.is_meta else tensor.detach()
                module.register_buffer(name, tensor, persistent=False)
            if hasattr(module, "track_running_stats"):  # BatchNorm: its statistics are fixed
                module.track_running_stats = False  # too (nor does it add a counter on load)
        return self.eval()

    def train(self, mode=True):
        return super().train(False)


def stand_ins(replaced, image_size):
    """Configs of the small stand-ins that DiffFAE builds for the `replaced` parts ({stage:
    file}) before install swaps the published networks in: sized to pass DiffFAE's checks (the
    built-in head's coefficient counts; ArcFace's 512 numbers of f_id), saved with the model
    and built again when it loads."""
    from estimator import EstimatorConfig, IdentityConfig
    from flame import FLAME
    from pretrained.arcface import EMBEDDING_DIM
    small = {"image_size": image_size, "base_channels": 8, "channel_mult": (1, 1, 1, 1),
             "blocks_per_stage": 1, "norm_groups": 8}
    configs = {}
    if "estimator" in replaced:
        head = FLAME()  # the built-in head, which DiffFAE builds
        configs["estimator"] = EstimatorConfig(**small, n_shape=head.n_shape, n_exp=head.n_exp,
                                               n_albedo=head.n_albedo)
    if "identity" in replaced:
        configs["identity"] = IdentityConfig(**small, embedding_dim=EMBEDDING_DIM)
    return configs


def install(model, deca="", arcface=""):
    """DiffFAE `model` with the paper's parts in place of the stand-ins it was built with:
    given `deca` (a deca_model.tar), DECA's encoder as model.estimator and FLAME 2020 with the
    BFM albedo from beside it as model.flame (and a renderer of its mesh); given `arcface` (a
    backbone.pth), ArcFace as model.identity, whose f_id the UNet must take at 512 numbers.
    Returns model; WeightsError or FlameModelError (one line) for a file that cannot be used."""
    from pretrained.arcface import EMBEDDING_DIM, load_arcface
    from pretrained.deca import load_deca, load_deca_flame
    from render import Renderer
    if deca:
        model.estimator = load_deca(deca)
        model.flame = load_deca_flame(deca)
        model.renderer = Renderer(model.flame.faces, model.flame.face_uvs, model.image_size,
                                  cull_backfaces=True)
    if arcface:
        id_dim = model.configs["unet"].id_dim
        if id_dim != EMBEDDING_DIM:
            raise WeightsError(f"{arcface}: ArcFace gives f_id of {EMBEDDING_DIM} numbers, but "
                               f"this model's UNet takes {id_dim}")
        model.identity = load_arcface(arcface)
    return model
