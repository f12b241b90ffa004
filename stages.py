"""What each training stage optimises and measures; train.py runs them.

- vqvae: L1 + codebook + β·commitment (+ hinge PatchGAN after `disc_start`); dead codes restarted.
  Measured: PSNR of reconstructions of held-out identities, perplexity and codebook usage.
- slots: the region encoder + slot attention + broadcast decoder reconstruct the frozen VQ latent
  of the image (DiffFAE §4.3 "Pretraining of RSC"; or its pixels, `--slots_target=pixel`).
  Measured: IoU of slot masks with the ground-truth regions, slots assigned to regions once for
  the whole held-out set.
- estimator: regression of the exact generating coefficients (each scaled by its spread in the
  data) plus a photometric loss: the predicted coefficients re-rendered through FLAME and
  render.py against the image on ground-truth face pixels (DECA's photometric term, Feng et al.
  2021 Eq. 8). Measured: head-pose error in degrees, jaw, expression, light and camera errors.
- identity: ArcFace (Deng et al. 2019) classification of synthetic identities. Measured:
  verification accuracy and CSIM of same / different held-out identities.
- ldm: DiffFAE itself (difffae.py), L = L_LDM + δ·L_ACR on same-person pairs, I_R rendered from
  the query's coefficients. Measured: PSNR of cross-identity edits of held-out people against
  the exact target image, whole and on the face, sampled with the EMA weights.

Each stage is an nn.Module whose forward(batch, step) returns a dict of losses with "loss" the
total, so DistributedDataParallel wraps it whole. Letters: B batch, K slots, H/W image size.
"""
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

import metrics
from layers import FACE, REGION_COLOURS
from data import save_image
from estimator import ArcMarginHead, CoefficientEstimator, EstimatorConfig, IdentityConfig
from estimator import IdentityEncoder
from difffae import DiffFAE, DiffusionConfig, render_face
from slots import RegionSlots, SlotsConfig, masks_at
from synthetic import SyntheticPortraits
from unet import UNetConfig
from vqvae import PatchDiscriminator, VQConfig, VQVAE, discriminator_hinge_loss, vq_loss

STAGES = ("vqvae", "slots", "estimator", "identity", "ldm")
PARTS = {"vqvae": {"vqvae": VQConfig}, "slots": {"slots": SlotsConfig},
         "estimator": {"estimator": EstimatorConfig}, "identity": {"identity": IdentityConfig},
         "ldm": {"unet": UNetConfig, "diffusion": DiffusionConfig}}
REQUIRES = {"slots": ("vqvae",), "ldm": ("vqvae", "slots", "estimator", "identity")}
# Spread of each coefficient in the synthetic data (synthetic.py's sampling), used to weigh the
# estimator's regression so that every group counts alike.
COEFFICIENT_SCALE = {"shape": 1.0, "albedo": 0.9, "expression": 0.45, "pose": 0.3,
                     "cam": (0.17, 0.009, 0.009), "light": 0.5}
MASK_EPS = 1e-6           # floor of mask probabilities before the log
GRID_ITEMS = 8            # images shown in evaluation grids
IDENTITY_EVAL = (32, 4)   # held-out identities × frames for the verification measurement


class MissingCheckpoint(ValueError):
    """A stage needs an earlier stage's checkpoint that is not there."""


def part_configs(stage):
    return PARTS[stage]


def count_identities(cfg, dataset):
    return cfg.identities if cfg.data == "synthetic" else len(dataset.identities)


def to_device(batch, device):
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def images_of(batch):
    """Sources and queries as one batch of single images (2B, 3, H, W)."""
    return torch.cat([batch["source"], batch["query"]])


# The network each stage trains, its config class, and its key prefix in the stage's state.
NETWORKS = {"vqvae": (VQVAE, VQConfig, "vqvae."), "slots": (RegionSlots, SlotsConfig, "slots."),
            "estimator": (CoefficientEstimator, EstimatorConfig, "estimator."),
            "identity": (IdentityEncoder, IdentityConfig, "encoder.")}


def load_part(out, stage, device, tag=""):
    """The trained network of an earlier stage (its variant `tag`), frozen, rebuilt from its
    checkpoint's config. Returns (network, its config)."""
    path = Path(out) / (f"{stage}-{tag}" if tag else stage) / "ckpt.pt"
    if not path.exists():
        raise MissingCheckpoint(f"{path} is missing: run `python train.py --stage {stage}` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    network, config_class, prefix = NETWORKS[stage]
    config = config_class(**checkpoint["config"][stage])
    model = network(config)
    model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items()
                           if k.startswith(prefix)})
    return model.to(device).eval().requires_grad_(False), config


def build(cfg, parts, device, n_identities):
    """The stage's module on `device`. Stages complete their part config from the data (image size,
    FLAME's coefficient counts, the VQ latent's shape) by replacing entries of `parts` in place,
    so the config saved with a checkpoint is the one the network was built with."""
    builders = {"vqvae": VQStage, "slots": SlotsStage, "estimator": EstimatorStage,
                "identity": IdentityStage, "ldm": LDMStage}
    return builders[cfg.stage](cfg, parts, device, n_identities).to(device)


def eval_set(cfg):
    """Held-out synthetic identities (the test split): a collated batch of `eval_items` items,
    plus IDENTITY_EVAL identities × frames for the identity stage."""
    test = SyntheticPortraits(cfg.image_size, "test", cfg.seed, length=cfg.eval_items)
    batch = default_collate(test.__getitems__(range(cfg.eval_items)))
    if cfg.stage == "identity":
        n_ids, n_frames = IDENTITY_EVAL
        ids = [test.identity_ids(i)[0] for i in range(n_ids)]
        images, _ = test.render([test.identity(a) for a in ids for _ in range(n_frames)],
                                [test.frame(i, f) for i in range(n_ids) for f in range(n_frames)])
        batch["identity_images"] = images
        batch["identity_labels"] = torch.arange(n_ids).repeat_interleave(n_frames)
    return batch


def _grid(rows, path):
    """Saves rows of (N, 3, H, W) tensors in [-1, 1] as one PNG: one row per entry."""
    save_image(torch.cat([torch.cat(list(row), 2) for row in rows], 1), path)


def _overlay(images, masks):
    """Images (B, 3, H, W) in [-1, 1] tinted by soft masks (B, K, H, W), one colour per slot."""
    colours = REGION_COLOURS[:masks.shape[1]].to(images)  # (K, 3)
    tint = torch.einsum("bkhw,kc->bchw", masks, colours) * 2 - 1
    return 0.45 * images + 0.55 * tint


def true_coefficients(batch, image):
    """The exact coefficients of batch[image] ("source" or "query") in the estimator's keys."""
    params = batch[f"{image}_params"]
    return {"shape": params["shape"], "albedo": params["albedo"],
            "expression": params["expression"], "pose": params["pose6"], "cam": params["cam"],
            "light": params["light"]}


class Stage(nn.Module):
    """Base: forward(batch, step) -> {"loss": total, ...}; after_step; evaluate(batch, png)."""

    def after_step(self, batch, step):
        """Work outside the gradient step (e.g. dead-code restarts); nothing by default."""


class VQStage(Stage):
    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        self.config = parts["vqvae"]
        self.vqvae = VQVAE(self.config)
        self.discriminator = None
        if self.config.disc_start < cfg.steps:
            self.discriminator = PatchDiscriminator(
                self.config.in_channels, self.config.disc_channels, self.config.disc_layers,
                self.config.norm_groups)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.last_z = None

    def forward(self, batch, step):
        images = images_of(batch)
        recon, info = self.vqvae(images)
        self.last_z = info["z"].detach()
        gan = self.discriminator is not None and self.config.disc_active(step)
        fake_logits = None
        if gan:  # D's weights detached: the generator term trains only the autoencoder
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fake_logits = torch.func.functional_call(self.discriminator, frozen, (recon,))
        terms = vq_loss(recon, images, info, fake_logits, self.vqvae.last_layer,
                        self.config.disc_weight)
        loss = terms.pop("total")
        if self.discriminator is not None:
            d_loss = discriminator_hinge_loss(self.discriminator(images),
                                              self.discriminator(recon.detach()))
            # before the warm-up ends D still runs (with weight 0): DDP needs every gradient
            loss = loss + (d_loss if gan else 0 * d_loss)
            terms["discriminator_loss"] = d_loss.detach()
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()},
                "perplexity": info["perplexity"].detach()}

    @torch.no_grad()
    def after_step(self, batch, step):
        quantizer = self.vqvae.quantizer
        if step == 0:  # data-dependent init: every code starts at an encoder output
            quantizer.code_usage.zero_()
        every = self.config.restart_every
        if step == 0 or (every and (step + 1) % every == 0):
            quantizer.restart_dead_codes(self.last_z, self.generator)
            if dist.is_initialized():  # ranks saw different batches: adopt rank 0's codebook
                dist.broadcast(quantizer.codebook.data, 0)
                dist.broadcast(quantizer.code_usage, 0)

    @torch.no_grad()
    def evaluate(self, batch, png):
        images = batch["source"].to(self.vqvae.last_layer.device)
        recon, info = self.vqvae(images)
        used = torch.unique(info["indices"]).numel()
        _grid([images[:GRID_ITEMS], recon[:GRID_ITEMS]], png)
        return {"psnr": float(metrics.psnr(recon.clamp(-1, 1), images).mean()),
                "perplexity": float(info["perplexity"]),
                "codebook_usage": used / self.config.codebook_size}


class SlotsStage(Stage):
    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        vqvae, vq_config = load_part(cfg.out, "vqvae", device)
        self.vq = {"model": vqvae}  # frozen, outside the state
        if cfg.slots_target == "latent":
            size = cfg.image_size // vq_config.downsample_factor
            target = {"target_size": size, "target_channels": vq_config.latent_channels}
        elif cfg.slots_target == "pixel":
            target = {"target_size": cfg.image_size, "target_channels": 3}
        else:
            raise ValueError(f"--slots_target={cfg.slots_target}: expected latent or pixel")
        parts["slots"] = dataclasses.replace(parts["slots"], image_size=cfg.image_size, **target)
        self.slots = RegionSlots(parts["slots"])
        self.target = cfg.slots_target
        self.supervision = cfg.slots_supervision
        if self.supervision and (cfg.data != "synthetic" or parts["slots"].num_slots != 4):
            raise ValueError("--slots_supervision needs synthetic data (ground-truth regions) "
                             "and 4 slots")

    def _target(self, images):
        if self.target == "pixel":
            return images
        return self.vq["model"].encode(images)

    def forward(self, batch, step):
        images = images_of(batch)
        out = self.slots(images)
        decoded = self.slots.decode(out["slots"])
        reconstruction = F.mse_loss(decoded["recon"], self._target(images))
        if not self.supervision:
            return {"loss": reconstruction}
        # optional (not in the paper): pull slot k's mask towards region k
        masks = masks_at(out["masks"], images.shape[-1])  # (2B, K, H, W)
        regions = torch.cat([batch["source_regions"], batch["query_regions"]])  # (2B, H, W)
        region_loss = F.nll_loss(masks.clamp(min=MASK_EPS).log(), regions)
        return {"loss": reconstruction + self.supervision * region_loss,
                "reconstruction_loss": reconstruction.detach(),
                "region_loss": region_loss.detach()}

    @torch.no_grad()
    def evaluate(self, batch, png):
        device = next(self.parameters()).device
        images = batch["source"].to(device)
        masks = masks_at(self.slots(images)["masks"], images.shape[-1])  # (B, K, H, W)
        confusion = metrics.region_confusion(masks.cpu(), batch["source_regions"])
        iou = metrics.slot_iou(confusion)
        n = GRID_ITEMS
        rows = [images[:n]] + [_overlay(images[:n], masks[:n, k:k + 1]) for k in
                               range(masks.shape[1])] + [_overlay(images[:n], masks[:n])]
        _grid(rows, png)
        names = ("background", "clothes", "hair", "face")
        return {"miou": float(iou.mean()), **{f"iou_{n}": float(v) for n, v in zip(names, iou)}}


class EstimatorStage(Stage):
    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        from flame import FLAME
        from render import Renderer
        flame = FLAME()
        parts["estimator"] = dataclasses.replace(
            parts["estimator"], image_size=cfg.image_size, n_shape=flame.n_shape,
            n_exp=flame.n_exp, n_albedo=flame.n_albedo)
        self.estimator = CoefficientEstimator(parts["estimator"])
        # fixed parts kept outside the state dict (no weights to save)
        self.fixed = {"flame": flame.to(device),
                      "renderer": Renderer(flame.faces, flame.face_uvs, cfg.image_size,
                                           cull_backfaces=True).to(device),
                      "scale": {k: torch.as_tensor(v, dtype=torch.float32, device=device)
                                for k, v in COEFFICIENT_SCALE.items()}}
        self.photometric_weight = cfg.photometric_weight

    def render(self, coefficients):
        """Re-renders predicted (or true) coefficients: the image I_R and its mask."""
        return render_face(self.fixed["flame"], self.fixed["renderer"], coefficients)

    def forward(self, batch, step):
        if "source_params" not in batch:
            raise ValueError("the estimator stage needs ground-truth coefficients: use "
                             "--data=synthetic")
        images = images_of(batch)
        source, query = true_coefficients(batch, "source"), true_coefficients(batch, "query")
        truth = {k: torch.cat([source[k], query[k]]) for k in COEFFICIENT_SCALE}
        predicted = self.estimator(images)
        terms = {}
        for key, scale in self.fixed["scale"].items():
            error = (predicted[key] - truth[key]) / scale
            terms[f"{key}_loss"] = error.pow(2).mean()
        regression = sum(terms.values())
        # the photometric term on the sources only: rendering is the costly part of a step
        n = len(batch["source"])
        render, mask = self.render({key: value[:n] for key, value in predicted.items()})
        # drawn and skin
        face = mask * (batch["source_regions"] == FACE)[:, None].to(mask.dtype)
        error = (render - batch["source"]).abs() * face
        photometric = error.sum() / (3 * face.sum()).clamp(min=1)
        loss = regression + self.photometric_weight * photometric
        return {"loss": loss, "photometric_loss": photometric.detach(),
                **{k: v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def evaluate(self, batch, png):
        device = next(self.parameters()).device
        images = batch["source"].to(device)
        predicted = self.estimator(images)
        truth = {k: v.to(device) for k, v in true_coefficients(batch, "source").items()}
        pose_error = metrics.angle_error_degrees(metrics.head_pose_degrees(predicted["pose"]),
                                                 metrics.head_pose_degrees(truth["pose"]))
        jaw = (predicted["pose"][:, 3] - truth["pose"][:, 3]).abs().rad2deg()
        result = {"yaw_deg": float(pose_error[:, 0].mean()),
                  "pitch_deg": float(pose_error[:, 1].mean()),
                  "roll_deg": float(pose_error[:, 2].mean()), "jaw_deg": float(jaw.mean())}
        for key in ("expression", "light", "cam", "shape", "albedo"):
            result[f"{key}_mae"] = float((predicted[key] - truth[key]).abs().mean())
        n = GRID_ITEMS
        render, _ = self.render({k: v[:n] for k, v in predicted.items()})
        true_render, _ = self.render({k: v[:n] for k, v in truth.items()})
        _grid([images[:n], render, true_render], png)
        return result


class IdentityStage(Stage):
    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        parts["identity"] = dataclasses.replace(parts["identity"], image_size=cfg.image_size)
        self.encoder = IdentityEncoder(parts["identity"])
        self.head = ArcMarginHead(parts["identity"].embedding_dim, n_identities,
                                  s=cfg.arcface_scale, m=cfg.arcface_margin)

    def forward(self, batch, step):
        images = images_of(batch)
        labels = torch.as_tensor(batch["identity"], device=images.device).repeat(2)
        logits = self.head(self.encoder(images), labels)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_accuracy": accuracy.detach()}

    @torch.no_grad()
    def evaluate(self, batch, png):
        device = next(self.parameters()).device
        embeddings = self.encoder(batch["identity_images"].to(device)).cpu()
        result = metrics.verification(embeddings, batch["identity_labels"])
        similarity = embeddings @ embeddings.T  # (N, N), frames of one identity are adjacent
        low, high = similarity.min(), similarity.max()
        stretched = (similarity - low) / (high - low).clamp(min=1e-8) * 2 - 1  # full grey range
        picture = F.interpolate(stretched[None, None], scale_factor=4, mode="nearest")[0]
        save_image(picture.expand(3, -1, -1), png)
        return result


class LDMStage(Stage):
    """DiffFAE's diffusion model (difffae.py): the UNet and the region encoder are trained, the
    VQ-VAE, estimator and identity encoder are frozen; all start from their stages' checkpoints
    and are saved together, so an ldm checkpoint is the whole method."""

    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        networks = {name: load_part(cfg.out, name, device, cfg.slots_tag if name == "slots"
                                    else "") for name in REQUIRES["ldm"]}
        for name, (_, config) in networks.items():
            parts[name] = config
        if parts["slots"].image_size != cfg.image_size:
            raise ValueError(f"--image_size={cfg.image_size}, but the pretrained parts work at "
                             f"{parts['slots'].image_size} px")
        parts["unet"] = dataclasses.replace(
            parts["unet"], in_channels=2 * parts["vqvae"].latent_channels,
            out_channels=parts["vqvae"].latent_channels, context_dim=parts["slots"].slot_dim,
            id_dim=parts["identity"].embedding_dim)
        self.model = DiffFAE(parts)
        for name, (network, _) in networks.items():
            getattr(self.model, name).load_state_dict(network.state_dict())
        for frozen in (self.model.vqvae, self.model.estimator, self.model.identity,
                       self.model.slots.decoder):  # the slot decoder only served pretraining
            frozen.requires_grad_(False)
        if parts["diffusion"].render_from == "truth" and cfg.data != "synthetic":
            raise ValueError("--diffusion.render_from=truth needs synthetic data (exact "
                             "coefficients); use --diffusion.render_from=estimated")
        self.generator = None

    def train(self, mode=True):
        super().train(mode)
        for frozen in (self.model.vqvae, self.model.estimator, self.model.identity):
            frozen.eval()  # frozen parts keep their inference behaviour
        return self

    def forward(self, batch, step):
        model = self.model
        if float(model.latent_scale) == 0:  # measured once, then saved with the model
            model.set_latent_scale(batch["query"])
            if dist.is_initialized():
                dist.all_reduce(model.latent_scale)
                model.latent_scale /= dist.get_world_size()
        with torch.autocast(batch["query"].device.type, enabled=False):  # geometry in fp32
            if model.diffusion.render_from == "truth":
                coefficients = true_coefficients(batch, "query")
            else:
                with torch.no_grad():
                    coefficients = model.estimator(batch["query"])
            rendered, _ = model.render(coefficients)
        return model.loss(batch["source"], batch["query"], rendered)

    @torch.no_grad()
    def evaluate(self, batch, png):
        """Cross-identity edits of held-out people against the exact target: PSNR of the whole
        image and of the target's face region, with a grid source | query | I_R | edit | target."""
        model = self.model
        device = model.latent_scale.device
        batch = to_device(batch, device)
        source = true_coefficients(batch, "source")
        query = true_coefficients(batch, "query")
        coefficients = {**query, "shape": source["shape"], "albedo": source["albedo"]}
        rendered, _ = model.render(coefficients)
        cond = model.conditions(batch["source"], rendered)
        edited = model.decode_latent(model.sample(cond, seed=0))
        face = (batch["target_regions"] == FACE)[:, None]
        n = GRID_ITEMS
        _grid([batch["source"][:n], batch["query"][:n], rendered[:n], edited[:n],
               batch["target"][:n]], png)
        return {"psnr": float(metrics.psnr(edited, batch["target"]).mean()),
                "psnr_face": float(metrics.psnr(edited, batch["target"], mask=face).mean())}
