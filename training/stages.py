"""The five training stages of DiffFAE (Wang et al. 2024, §4.3, §5.4); train.py runs them: four
pretrained parts, then the diffusion model (the ldm stage, DiffFAE.loss, Eq. 8). Each class says
what its stage optimises and measures. A stage is an nn.Module whose forward(batch, step) returns
a dict of losses with "loss" the total, so DistributedDataParallel wraps it whole; evaluate(batch,
png) measures held-out synthetic identities (a batch on the stage's device) and draws a picture.

Letters: B batch, K slots, H/W image size.
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import default_collate

from assets.synthetic import SyntheticPortraits, pool_path, true_coefficients
from difffae import DiffFAE, combine_coefficients, render_face
from estimator import (COEFFICIENT_SCALE, CoefficientEstimator, IdentityEncoder, load_arcface,
                       load_deca)
from fitting.fit import fittable, photometric_loss
from fitting.landmarks import LandmarkMesh, landmark_vertices
from layers import FACE, REGION_NAMES
from pretrained import install, stand_ins
from pretrained.deca import load_deca_flame
from runtime.checkpoint import PARTS, rebuild
from runtime.guard import atomic_save, previous_checkpoint, read_stage_checkpoint
from runtime.images import save_image
from samplers import predict_x0
from slots import RegionSlots, masks_at, pretraining_loss
from training import metrics
from training.arcface import ArcMarginHead
from training.config import PRETRAINED, build_configs
from training.frozen_cache import FrozenCache
from training.pictures import enlarge, grid as picture_grid, mask_rows
from vqvae import VQVAE, vq_loss

EXPRESSION_MESH_SCALE = 0.003  # metres: the spread of a vertex's expression and jaw movement
GRID_ITEMS = 8            # images shown in evaluation grids
TRUTH_SEED = 104_729      # offset of the seed of the ldm stage's draws of exact renders
X0_REPORT_STEPS = (999, 800, 600, 400, 200, 50)  # timesteps of the ldm stage's x̂_0 report
ROUND_TRIP_ZOOM = 3       # the vqvae stage's grid: held-out images over their round trips, 3×
IDENTITY_EVAL = (32, 4)   # held-out identities × frames for the verification measurement


# -- Shared by the stages: batches, earlier stages' networks, the held-out set, pictures -----------

class MissingCheckpoint(ValueError):
    """A stage needs an earlier stage's checkpoint that is not there."""


def step_generator(seed, step):
    """A generator of (seed, step) alone: what step s draws from it (its batch, its restarted
    codes) is the same in a resumed run as in an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def images_of(batch):
    """Sources and queries as one batch of single images (2B, 3, H, W)."""
    return torch.cat([batch["source"], batch["query"]])


def missing(path, stage, out):
    """The error for an earlier stage's checkpoint that is not there, with the command to make
    it."""
    run = f"python train.py --stage {stage} --out={out}"
    return MissingCheckpoint(f"{path} is missing: run `{run}` first")


def require_earlier_checkpoints(cfg):
    """Refuses, in one line and before any work, a stage whose earlier stages are not trained,
    or whose published networks (--deca, --arcface) cannot be used."""
    replaced = check_pretrained(cfg)
    for stage in requirements(cfg):
        if stage in replaced:
            continue
        path = Path(cfg.out) / stage / "ckpt.pt"
        if not path.exists() and not previous_checkpoint(path).exists():
            raise missing(path, stage, cfg.out)


def requirements(cfg):
    """The earlier stages whose networks this stage reads."""
    frames = cfg.stage == "estimator" and cfg.data != "synthetic"  # faces found by the slots
    return PARTS[cfg.stage].requires + (("slots",) if frames else ())


def replaced_parts(cfg):
    """{stage: file} of the parts whose published networks the ldm stage loads instead of the
    stages' stand-ins (--deca: DECA's estimator, --arcface: ArcFace's identity encoder)."""
    return {stage: getattr(cfg, option) for stage, option in PRETRAINED.items()
            if cfg.stage == "ldm" and getattr(cfg, option)}


def check_pretrained(cfg):
    """replaced_parts(cfg), their files loaded once to check them (a wrong one is one line,
    before the data is read); DECA refused on the synthetic portraits, whose coefficients are
    the built-in head's, not FLAME 2020's."""
    replaced = replaced_parts(cfg)
    if "estimator" in replaced:
        if cfg.data == "synthetic":
            raise ValueError("--deca: DECA's coefficients drive FLAME 2020, and the synthetic "
                             "portraits' are the built-in head's: give --data a folder of frames")
        load_deca(cfg.deca)
        load_deca_flame(cfg.deca)
    if "identity" in replaced:
        load_arcface(cfg.arcface)
    return replaced


def load_part(out, stage, device):
    """The trained network of an earlier stage from <out>/<stage>/ckpt.pt, frozen, with one
    line of warning when that stage stopped short of its steps (not by its time limit).
    Returns (network, its config)."""
    path = Path(out) / stage / "ckpt.pt"
    checkpoint = read_stage_checkpoint(path)
    if checkpoint is None:
        raise missing(path, stage, out)
    run = checkpoint["config"].get("train", {})
    unfinished = checkpoint.get("step", 0) < run.get("steps", 0) and not run.get("time_limit")
    if unfinished and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {checkpoint['file']} is at step {checkpoint['step']} of {run['steps']}:"
              f" this stage starts from an unfinished {stage} stage (finish it with `python "
              f"train.py --stage {stage} --out={out}`)", file=sys.stderr)
    model, config = rebuild(checkpoint, stage)
    return model.to(device).eval().requires_grad_(False), config


def eval_set(cfg):
    """Held-out synthetic identities (the test split): a collated batch of `eval_items` items,
    plus IDENTITY_EVAL identities × frames for the identity stage."""
    test = SyntheticPortraits(cfg.image_size, "test", cfg.seed, length=cfg.eval_items)
    batch = default_collate(test.__getitems__(range(cfg.eval_items)))
    if cfg.stage == "identity":
        n_ids, n_frames = IDENTITY_EVAL
        ids = [test.identity_ids(i)[0] for i in range(n_ids)]
        images, regions = test.render([test.identity(a) for a in ids for _ in range(n_frames)],
                                      [test.frame(i, f) for i in range(n_ids)
                                       for f in range(n_frames)])
        batch["identity_images"], batch["identity_regions"] = images, regions
        batch["identity_labels"] = torch.arange(n_ids).repeat_interleave(n_frames)
    return batch


def grid(rows, path):
    """Saves rows of (N, 3, H, W) tensors in [-1, 1] as one PNG: one row per entry."""
    save_image(picture_grid(rows), path)


class Stage(nn.Module):
    def prepare(self, dataset, master):
        """Work once before the first step, after the checkpoint is loaded (the ldm stage's
        FrozenCache); nothing by default."""

    def after_step(self, batch, step):
        """Work outside the gradient step (the VQ-VAE's code restarts); nothing by default."""


# -- The stages ------------------------------------------------------------------------------------

class VQStage(Stage):
    """The VQ-VAE, retrained on faces as DiffFAE §5.4 does (LDM's VQ-reg autoencoder, Esser et
    al. 2021, without its GAN and LPIPS terms: vqvae.py): L1 [+ the Laplacian detail term] +
    codebook + β·commitment; dead codes restarted at encoder outputs.
    With `face_weight` the reconstruction terms weigh the true face's pixels more (vqvae.py).
    Measures the PSNR (whole image, and the face's) and the face detail (metrics.face_detail,
    medians) of reconstructions of held-out identities, the perplexity and the codebook usage;
    draws the images over their round trips, enlarged."""

    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        self.config = parts["vqvae"]
        if self.config.face_weight and cfg.data != "synthetic":
            raise ValueError(f"--vqvae.face_weight={self.config.face_weight} needs synthetic "
                             f"data (exact face masks); use --vqvae.face_weight=0")
        self.vqvae = VQVAE(self.config)
        self.seed = cfg.seed
        self.last_z = None

    def forward(self, batch, step):
        images = images_of(batch)
        recon, info = self.vqvae(images)
        self.last_z = info["z"].detach()
        weight = None
        if self.config.face_weight:  # ω = 1 + a on the face
            face = torch.cat([batch["source_regions"], batch["query_regions"]]) == FACE
            weight = 1 + self.config.face_weight * face[:, None].to(images.dtype)
        terms = vq_loss(recon, images, info, self.config.detail_weight, weight)
        loss = terms.pop("total")
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()},
                "perplexity": info["perplexity"].detach()}

    @torch.no_grad()
    def after_step(self, batch, step):
        quantizer = self.vqvae.quantizer
        if step == 0:  # data-dependent init: every code starts at an encoder output
            quantizer.code_usage.zero_()
        every = self.config.restart_every
        if step == 0 or (every and (step + 1) % every == 0):
            quantizer.restart_dead_codes(self.last_z, step_generator(self.seed, step))
            if dist.is_initialized():  # ranks saw different batches: adopt rank 0's codebook
                dist.broadcast(quantizer.codebook.data, 0)
                dist.broadcast(quantizer.code_usage, 0)

    @torch.no_grad()
    def evaluate(self, batch, png):
        images = batch["source"]
        recon, info = self.vqvae(images)
        used = torch.unique(info["indices"]).numel()
        recon = recon.clamp(-1, 1)
        side = ROUND_TRIP_ZOOM * images.shape[-1]  # enlarged, so that the eyes can be judged
        grid([enlarge(images[:GRID_ITEMS], side), enlarge(recon[:GRID_ITEMS], side)], png)
        face = metrics.psnr(recon, images, mask=(batch["source_regions"] == FACE)[:, None])
        detail = metrics.face_detail(recon, images, batch["source_regions"])
        return {"psnr": float(metrics.psnr(recon, images).mean()),
                "psnr_face": float(face.nanmean()),
                **{name: float(values.nanmedian()) for name, values in detail.items()},
                "perplexity": float(info["perplexity"]),
                "codebook_usage": used / self.config.codebook_size}


def supervision(cfg, slots_config):
    """The weight of the region term of slots.pretraining_loss, checked: it needs ground-truth
    regions (synthetic data) and one slot per region."""
    if cfg.slots_supervision and (cfg.data != "synthetic"
                                  or slots_config.num_slots != len(REGION_NAMES)):
        raise ValueError("--slots_supervision needs synthetic data (ground-truth regions) "
                         f"and {len(REGION_NAMES)} slots")
    return cfg.slots_supervision


class SlotsStage(Stage):
    """Pretraining of RSC (DiffFAE §4.3): the region encoder φ^E, slot attention (Locatello et
    al. 2020) and a broadcast decoder ζ reconstruct the frozen VQ latent of the image (MSE).
    With `slots_supervision` > 0 (not in the paper; the tiny preset) a mask loss also pulls slot
    k's mask towards region k. Measures the IoU of the slot masks with the true regions, slots
    assigned to regions once for the whole held-out set (metrics.slot_iou)."""

    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        vqvae, vq_config = load_part(cfg.out, "vqvae", device)
        self.vq = {"model": vqvae}  # frozen, outside the state
        parts["slots"] = dataclasses.replace(
            parts["slots"], image_size=cfg.image_size, target_channels=vq_config.latent_channels,
            target_size=cfg.image_size // vq_config.downsample_factor)
        self.slots = RegionSlots(parts["slots"])
        self.supervision = supervision(cfg, parts["slots"])

    def forward(self, batch, step):
        regions = torch.cat([batch["source_regions"], batch["query_regions"]])  # (2B, H, W)
        images = images_of(batch)
        return pretraining_loss(self.slots, images, self.vq["model"].encode(images), regions,
                                self.supervision)

    @torch.no_grad()
    def evaluate(self, batch, png):
        images = batch["source"]
        masks = masks_at(self.slots(images)["masks"], images.shape[-1])  # (B, K, H, W)
        iou = metrics.slot_iou(metrics.region_confusion(masks.cpu(),
                                                        batch["source_regions"].cpu()))
        n = GRID_ITEMS
        grid([images[:n], *mask_rows(images[:n], masks[:n])], png)  # a row per slot, argmax
        return {"miou": float(iou.mean()),
                **{f"iou_{name}": float(v) for name, v in zip(REGION_NAMES, iou)}}


class EstimatorStage(Stage):
    """The coefficient estimator, in DECA's role for SPC (DiffFAE §4.1; Feng et al. 2021):
    regression of the exact generating coefficients, each scaled by its spread in the data,
    plus the squared distance in mm of the meshes of the predicted and the true expression and
    jaw (a vertex loss, so that each coefficient counts by how far it moves the face; our
    choice), plus a photometric loss: the predicted coefficients re-rendered through FLAME and
    render.py against the image on ground-truth face pixels (DECA's photometric term, Feng et
    al. 2021 Eq. 8). With a landmark detector (n_landmarks > 0), also its L1 distance in
    pixels to the true landmarks: the landmark vertices of the true mesh, projected (integral
    regression, Sun et al. 2018). Measures the head-pose error in degrees, the jaw error, the
    expression distance in mm (metrics.expression_distance), the light, camera, shape and
    albedo errors, and the landmarks' mean distance in pixels.
    With --data=PATH, a vox-png folder of frames without coefficients, it also learns from those
    frames through the photometric loss alone (frames_term), beside the synthetic pairs
    (train.WithFrames): DECA's way of learning from unlabelled images."""

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
        flame = flame.to(device)
        self.fixed = {"flame": flame,
                      "renderer": Renderer(flame.faces, flame.face_uvs, cfg.image_size,
                                           cull_backfaces=True).to(device),
                      "scale": {k: torch.as_tensor(v, dtype=torch.float32, device=device)
                                for k, v in COEFFICIENT_SCALE.items()},
                      "landmarks": LandmarkMesh(flame, landmark_vertices(
                          flame, parts["estimator"].n_landmarks))}
        if cfg.data != "synthetic":  # frames without coefficients: the face slot's mask
            self.fixed["slots"], slots_config = load_part(cfg.out, "slots", device)
            if slots_config.image_size != cfg.image_size:
                raise ValueError(f"--image_size={cfg.image_size}, but the slots stage's region "
                                 f"encoder works at {slots_config.image_size} px")
        self.frames_weight = cfg.frames_weight

    def render(self, coefficients):
        """Re-renders predicted (or true) coefficients: the image I_R and its mask."""
        return render_face(self.fixed["flame"], self.fixed["renderer"], coefficients)

    def true_landmarks(self, coefficients):
        """The landmark vertices of the exact mesh, projected: (B, K, 2) pixels."""
        return self.fixed["landmarks"].project(coefficients, self.estimator.cfg.image_size)

    def forward(self, batch, step):
        images = images_of(batch)
        source, query = true_coefficients(batch, "source"), true_coefficients(batch, "query")
        truth = {k: torch.cat([source[k], query[k]]) for k in COEFFICIENT_SCALE}
        predicted = self.estimator(images)
        terms = {}
        for key, scale in self.fixed["scale"].items():
            error = (predicted[key] - truth[key]) / scale
            terms[f"{key}_loss"] = error.pow(2).mean()
        # the expression and the jaw also as the surface they move: a coefficient counts by how
        # far it moves the face, as the judge measures it (metrics.expression_distance)
        moved = (metrics.expression_vertices(self.fixed["flame"], predicted)
                 - metrics.expression_vertices(self.fixed["flame"], truth))  # (2B, V, 3)
        terms["expression_mesh_loss"] = (moved / EXPRESSION_MESH_SCALE).pow(2).sum(2).mean()
        if self.estimator.landmarks is not None:
            error = self.estimator.landmarks(images) - self.true_landmarks(truth)  # (2B, K, 2)
            terms["landmark_loss"] = error.abs().mean()
        regression = sum(terms.values())
        # the photometric term on the sources only: rendering is the costly part of a step
        n = len(batch["source"])
        render, mask = self.render({key: value[:n] for key, value in predicted.items()})
        skin = (batch["source_regions"] == FACE)[:, None].to(mask.dtype)
        photometric = photometric_loss(render, mask, batch["source"], skin)
        loss = regression + photometric
        if "frame_source" in batch:  # frames without coefficients (--data=PATH): photometric
            terms["frames_photometric_loss"] = self.frames_term(batch)
            loss = loss + self.frames_weight * terms["frames_photometric_loss"]
        return {"loss": loss, "photometric_loss": photometric.detach(),
                **{k: v.detach() for k, v in terms.items()}}

    def frames_term(self, batch):
        """The photometric loss of frames that carry no coefficients, as fitting.fit.refine fits an
        edit's: the estimator's reading re-rendered, against the frame on the render's pixels
        that the slots stage's region encoder calls face (no face parser is needed). Like the
        fit, it does not move the jaw and the expression: when it did, they ended 2,000 steps
        at twice the errors of the run without frames (docs/measurements.md)."""
        frames = torch.cat([batch["frame_source"], batch["frame_query"]])
        with torch.no_grad():
            face = masks_at(self.fixed["slots"](frames)["masks"], frames.shape[-2:])
        render, mask = self.render(fittable(self.estimator(frames)))
        return photometric_loss(render, mask, frames, face[:, FACE:FACE + 1])

    @torch.no_grad()
    def evaluate(self, batch, png):
        images = batch["source"]
        predicted = self.estimator(images)
        truth = true_coefficients(batch, "source")
        pose_error = metrics.head_pose_error(predicted["pose"], truth["pose"])  # (B, 3)
        jaw = (predicted["pose"][:, 3] - truth["pose"][:, 3]).abs().rad2deg()
        result = {"yaw_deg": float(pose_error[:, 0].mean()),
                  "pitch_deg": float(pose_error[:, 1].mean()),
                  "roll_deg": float(pose_error[:, 2].mean()), "jaw_deg": float(jaw.mean())}
        result["expression_mm"] = float(metrics.expression_distance(
            self.fixed["flame"], predicted, truth).mean())
        for key in ("expression", "light", "cam", "shape", "albedo"):
            result[f"{key}_mae"] = float((predicted[key] - truth[key]).abs().mean())
        if self.estimator.landmarks is not None:
            result["landmarks_px"] = float((self.estimator.landmarks(images)
                                            - self.true_landmarks(truth)).norm(dim=-1).mean())
        n = GRID_ITEMS
        render, _ = self.render({k: v[:n] for k, v in predicted.items()})
        true_render, _ = self.render({k: v[:n] for k, v in truth.items()})
        grid([images[:n], render, true_render], png)
        return result


class IdentityStage(Stage):
    """The identity encoder Θ^E of DiffFAE §4.2, trained as ArcFace (Deng et al. 2019, Eq. 3:
    additive angular margin m, scale s) to classify the synthetic identities. With `face_only`
    it sees the face alone (metrics.face_only), as tools/evaluate.py's CSIM judge reads it. Measures
    the verification accuracy and the CSIM of same / different held-out identities."""

    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        parts["identity"] = dataclasses.replace(parts["identity"], image_size=cfg.image_size)
        self.encoder = IdentityEncoder(parts["identity"])
        self.head = ArcMarginHead(parts["identity"].embedding_dim, n_identities,
                                  s=cfg.arcface_scale, m=cfg.arcface_margin)
        if cfg.face_only and cfg.data != "synthetic":
            raise ValueError("--face_only needs synthetic data (ground-truth face regions)")
        self.face_only = cfg.face_only

    def seen(self, images, regions):
        """What the encoder is shown of images (B, 3, H, W) with `regions` (B, H, W)."""
        return metrics.face_only(images, regions) if self.face_only else images

    def forward(self, batch, step):
        regions = torch.cat([batch["source_regions"], batch["query_regions"]])
        images = self.seen(images_of(batch), regions)
        labels = torch.as_tensor(batch["identity"], device=images.device).repeat(2)
        embeddings = self.encoder(images)
        with torch.autocast(images.device.type, enabled=False):  # cos θ + m wants float32
            logits = self.head(embeddings.float(), labels)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "train_accuracy": accuracy.detach()}

    @torch.no_grad()
    def evaluate(self, batch, png):
        embeddings = self.encoder(self.seen(batch["identity_images"],
                                            batch["identity_regions"])).cpu()
        result = metrics.verification(embeddings, batch["identity_labels"].cpu())
        similarity = embeddings @ embeddings.T  # (N, N), frames of one identity are adjacent
        low, high = similarity.min(), similarity.max()
        stretched = (similarity - low) / (high - low).clamp(min=1e-8) * 2 - 1  # full grey range
        picture = F.interpolate(stretched[None, None], scale_factor=4, mode="nearest")[0]
        save_image(picture.expand(3, -1, -1), png)
        return result


class LDMStage(Stage):
    """DiffFAE itself (§4.3 "Finetuning of LDM"): DiffFAE.loss, the whole step, on same-person
    pairs. The UNet and the region encoder train; the VQ-VAE, estimator and identity encoder
    stay frozen; all start from their stages' checkpoints and are saved together, so an ldm
    checkpoint is the whole method. Measures the PSNR of cross-identity edits of held-out
    people against the exact target, whole and on the target's face, and the face detail
    (medians), sampled with the EMA weights (train.py swaps them in) and I_R drawn as in every
    edit; and the x̂_0 report (x0_report): the face error of x̂_0 at fixed noise levels beside
    f_r's, and how far x̂_0 follows I_R when handed the exact render instead (not with --deca).
    With --deca and --arcface the published DECA and ArcFace networks replace the estimator and
    identity stages' (pretrained.install), fixed as the paper keeps them."""

    def __init__(self, cfg, parts, device, n_identities):
        super().__init__()
        replaced = replaced_parts(cfg)  # the published networks that replace stages' parts
        networks = {name: load_part(cfg.out, name, device) for name in PARTS["ldm"].requires
                    if name not in replaced}
        for name, (_, config) in networks.items():
            parts[name] = config
        parts.update(stand_ins(replaced, cfg.image_size))
        sizes = {name: parts[name].image_size for name in ("slots", "estimator", "identity")}
        if set(sizes.values()) != {cfg.image_size}:
            raise ValueError(f"--image_size={cfg.image_size}, but the pretrained parts work at "
                             f"{sizes} px")
        d = parts["diffusion"]
        for name in ("truth_fraction", "slots_supervision"):
            if getattr(d, name) and cfg.data != "synthetic":
                raise ValueError(f"--diffusion.{name}={getattr(d, name)} needs synthetic data "
                                 f"(exact coefficients and regions); use --diffusion.{name}=0")
        if d.slots_supervision and parts["slots"].num_slots != len(REGION_NAMES):
            raise ValueError(f"--diffusion.slots_supervision needs {len(REGION_NAMES)} slots")
        self.device, self.cache, self.seed = device, None, cfg.seed
        cached = cfg.frozen_cache and cfg.data == "synthetic" and cfg.pool > 0
        self.pool_file = pool_path(Path(cfg.out) / "data", cfg.image_size, cfg.pool,
                                   cfg.identities, cfg.seed) if cached else None
        parts["unet"] = dataclasses.replace(
            parts["unet"], in_channels=2 * parts["vqvae"].latent_channels,
            out_channels=parts["vqvae"].latent_channels, context_dim=parts["slots"].slot_dim,
            id_dim=parts["identity"].embedding_dim)
        self.model = DiffFAE(parts)
        for name, (network, _) in networks.items():
            getattr(self.model, name).load_state_dict(network.state_dict())
        install(self.model, cfg.deca, cfg.arcface)  # fixed, and left out of the checkpoints
        self.exact_render = "estimator" not in replaced  # the held-out coefficients fit FLAME
        # the slot decoder ζ stays as pretrained: with slots_weight > 0 it holds the tokens to
        # what it learned to decode
        for frozen in (self.model.vqvae, self.model.estimator, self.model.identity,
                       self.model.slots.decoder):
            frozen.requires_grad_(False)
        # render_from "refined": the fit of I_R weighs the pixels by the face masks of the
        # region encoder as pretrained, a frozen copy, so that the cached fits stay valid on
        # resume while the trained one moves
        self.fit_slots = networks["slots"][0] if d.render_from == "refined" else None

    def train(self, mode=True):
        super().train(mode)
        for frozen in (self.model.vqvae, self.model.estimator, self.model.identity,
                       self.fit_slots):
            if frozen is not None:
                frozen.eval()  # frozen parts keep their inference behaviour
        return self

    def prepare(self, dataset, master):
        if self.pool_file is not None:  # after loading: the fingerprint is of the loaded weights
            self.cache = FrozenCache(self.model, dataset, self.pool_file, self.device, master,
                                     self.fit_slots)

    def forward(self, batch, step):
        model, source = self.model, batch["source"]
        if not model.latent_scale_set:  # LDM's scale_factor, from the first batch's queries
            model.set_latent_scale(batch["query"])
        # the pairs whose I_R is exact: drawn from (seed, step) alone, so that a resumed run
        # draws what an uninterrupted one does
        draw = torch.rand(len(source), generator=step_generator(self.seed + TRUTH_SEED, step))
        exact = draw < model.diffusion.truth_fraction
        synthetic = "query_params" in batch
        return model.loss(source, batch["query"],
                          true_coefficients(batch, "query") if synthetic else None,
                          batch.get("source_regions"), exact=exact,
                          frozen=None if self.cache is None else self.cache(batch["index"]),
                          fit_slots=self.fit_slots)

    @torch.no_grad()
    def evaluate(self, batch, png):
        trace = {}  # the edit as sample.py makes it: I_R from the estimator
        out = self.model.edit(batch["source"], batch["query"], seed=0, trace=trace)
        edited, masks = out["image"], trace["cond"]["masks"]
        face = (batch["target_regions"] == FACE)[:, None]
        n = GRID_ITEMS
        grid([batch["source"][:n], batch["query"][:n], out["render"][:n], edited[:n],
              batch["target"][:n], *mask_rows(batch["source"][:n], masks[:n])], png)
        detail = metrics.face_detail(edited, batch["target"], batch["target_regions"])
        z0 = self.model.encode_latent(batch["target"])
        latent_face = F.avg_pool2d(face.float(), edited.shape[-1] // z0.shape[-1]) > 0.5
        exact_f_r = None  # with --deca the held-out portraits' coefficients are not FLAME 2020's
        if self.exact_render:
            exact = combine_coefficients(true_coefficients(batch, "source"),
                                         true_coefficients(batch, "query"))  # Eq. 3, exactly
            exact_f_r = self.model.encode_latent(self.model.render(exact)[0])
        return {"psnr": float(metrics.psnr(edited, batch["target"]).mean()),
                "psnr_face": float(metrics.psnr(edited, batch["target"], mask=face).mean()),
                **{name: float(values.nanmedian()) for name, values in detail.items()},
                **x0_report(self.model, trace["cond"], z0, latent_face, exact_f_r)}


def x0_report(model, cond, z0, face, exact_f_r=None, timesteps=X0_REPORT_STEPS, seed=0):
    """How well the denoiser knows the answer at each noise level, on the face: for each t,
    z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε for two noise draws ε, and x̂_0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t.
    Returns {"x0_face_rms_t{t}": rms of x̂_0 − z_0 (first draw), "x0_spread_t{t}": rms of the
    difference of the two draws' x̂_0, "f_r_face_rms": rms of f_r − z_0}, each over the face's
    latent pixels (face (B, 1, h, w), a 0/1 mask) and the channels; z_0 (B, C, h, w) the
    target's scaled latent, cond the edit's conditions (DiffFAE.conditions). Given exact_f_r,
    the latent of the exact render, also "exact_f_r_face_rms" and how far x̂_0 follows I_R,
    "x0_follows_f_r_t{t}" = ⟨Δx̂_0, Δf_r⟩/⟨Δf_r, Δf_r⟩ over the face, Δ the change from cond's
    f_r to exact_f_r at the same z_t: 1 if x̂_0 moves with f_r, 0 if it ignores it."""
    generator = torch.Generator(device=z0.device).manual_seed(seed)
    weight = face.expand_as(z0).float()

    def dot(a, b):
        return (a.float() * b.float() * weight).sum()

    def rms(error):
        return float((dot(error, error) / weight.sum().clamp(min=1)).sqrt())

    report = {"f_r_face_rms": rms(cond["f_r"] - z0)}
    if exact_f_r is not None:
        report["exact_f_r_face_rms"] = rms(exact_f_r - z0)
        moved, exact_cond = exact_f_r - cond["f_r"], {**cond, "f_r": exact_f_r}
    for t in (t for t in timesteps if t < len(model.alphas_cumprod)):
        steps = torch.full((len(z0),), t, device=z0.device)
        alpha_bar = model.alphas_cumprod[t]
        z_t = [alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * torch.randn(
            z0.shape, generator=generator, device=z0.device) for _ in range(2)]
        x0 = [predict_x0(z, model.denoise(z, steps, cond)[0], alpha_bar) for z in z_t]
        report[f"x0_face_rms_t{t}"] = rms(x0[0] - z0)
        report[f"x0_spread_t{t}"] = rms(x0[0] - x0[1])
        if exact_f_r is not None:
            followed = predict_x0(z_t[0], model.denoise(z_t[0], steps, exact_cond)[0], alpha_bar)
            report[f"x0_follows_f_r_t{t}"] = float(dot(followed - x0[0], moved)
                                                   / dot(moved, moved).clamp(min=1e-12))
    return report


def build(cfg, parts, device, n_identities):
    """The stage's module on `device`. Stages complete their part config from the data (image
    size, FLAME's coefficient counts, the VQ latent's shape) by replacing entries of `parts` in
    place, so the config saved with a checkpoint is the one the network was built with."""
    stage = {"vqvae": VQStage, "slots": SlotsStage, "estimator": EstimatorStage,
             "identity": IdentityStage, "ldm": LDMStage}[cfg.stage]
    return stage(cfg, parts, device, n_identities).to(device)


def write_random_parts(out, options=()):
    """Checkpoints of the four stages the ldm stage starts from, with random weights, under
    `out` in this program's format; `options` (command-line ones) size them. For tests and
    benchmarks, whose figures do not depend on the weights. The VQ-VAE goes first: the slots
    stage reads its config."""
    for stage in PARTS["ldm"].requires:
        cfg, parts = build_configs(["--stage", stage, *options, f"--out={out}"])
        built = build(cfg, parts, torch.device("cpu"), n_identities=cfg.identities)
        atomic_save({"stage": stage, "step": 0, "model": built.state_dict(),
                     "config": {stage: vars(parts[stage])}}, Path(out) / stage / "ckpt.pt")
