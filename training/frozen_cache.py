"""The ldm stage's frozen-parts cache. In a training step of DiffFAE (Wang et al. 2024, §4.3) only
the UNet and the region encoder learn; the VQ-VAE, the coefficient estimator, FLAME, the renderer
and the identity encoder are fixed, so what they compute for a pair of the training pool is the
same every time the pair is drawn. FrozenCache computes it once per pair and keeps it on disk
beside the pool; pair_inputs is what it computes, and what an uncached step computes anew.
"""
import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import default_collate
from tqdm import tqdm

from runtime.guard import write_atomic

from training.datasets import to_device
from assets.synthetic import true_coefficients


@torch.no_grad()
def pair_inputs(model, batch, fit_slots=None):
    """DiffFAE.frozen_inputs of a batch of training pairs, every one of them (fit_slots passed
    on): the query's exact coefficients are the synthetic pool's."""
    return model.frozen_inputs(batch["source"], batch["query"], true_coefficients(batch, "query"),
                               fit_slots, every=True)


class FrozenCache:
    """pair_inputs of every pair of a synthetic pool, with the source's latent and the exact
    render's, computed once before training and kept on disk beside the pool: a training step
    then runs only the parts that train, the region encoder and the UNet. The file is named by
    the pool's file and by a fingerprint of every tensor of the frozen parts and of the options
    frozen_inputs reads, so that outputs of other networks are never read; a file that cannot
    be used is computed again, with one line saying why. The outputs are computed in float32,
    and equal what an uncached step computes on the CPU (tested); under bf16 autocast they are
    the more exact."""

    BATCH = 64  # pairs per forward pass while computing
    KEYS = ("z0", "f_r", "id", "source_z", "f_r_truth")

    def __init__(self, model, pool, pool_file, device, master, fit_slots=None):
        self.fit_slots = fit_slots  # the region encoder of the fit, with render_from "refined"
        self.path = Path(pool_file).with_name(
            f"{Path(pool_file).stem}-frozen-{self.fingerprint(model, fit_slots)}.pt")
        tensors, problem = self.read(len(pool)) if self.path.exists() else (None, "missing")
        if master and tensors is None:
            if problem != "missing":
                print(f"{self.path}: {problem}; computing it again", file=sys.stderr)
            tensors = self.compute(model, pool, device)
            write_atomic(self.path, lambda file: torch.save(tensors, file))
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's file
        if tensors is None:
            tensors, problem = self.read(len(pool))
            if tensors is None:
                raise ValueError(f"{self.path}: {problem}")
        self.tensors = {key: value.to(device) for key, value in tensors.items()}

    @staticmethod
    def fingerprint(model, fit_slots=None):
        """12 hex digits of SHA-256 over the frozen parts' tensors and frozen_inputs' options
        (with render_from "refined", also the fit's steps and fit_slots' tensors)."""
        d = model.diffusion
        options = (d.render_from,)
        modules = {part: getattr(model, part)
                   for part in ("vqvae", "estimator", "identity", "flame", "renderer")}
        if d.render_from == "refined":
            options, modules["fit_slots"] = (*options, d.refine_steps), fit_slots
        digest = hashlib.sha256(repr(options).encode())
        for part, module in modules.items():
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                digest.update(f"{part}.{name}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    @torch.no_grad()
    def compute(self, model, pool, device):
        parts = []
        for start in tqdm(range(0, len(pool), self.BATCH), desc="ldm: the frozen parts' outputs",
                          unit="batch"):
            batch = to_device(default_collate(pool.__getitems__(
                range(start, min(len(pool), start + self.BATCH)))), device)
            frozen = pair_inputs(model, batch, self.fit_slots)
            parts.append({key: value.cpu() for key, value in frozen.items()})
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def read(self, pairs):
        """(the tensors, None) if the file holds outputs for `pairs` pairs, else (None, why)."""
        try:
            tensors = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, not a torch file, unsafe contents
            return None, f"unreadable ({type(error).__name__})"
        if not isinstance(tensors, dict) or set(tensors) != set(self.KEYS):
            return None, "not a cache of this version (other keys)"
        if any(not torch.is_tensor(t) or len(t) != pairs for t in tensors.values()):
            return None, f"inconsistent (expected {pairs} pairs in every tensor)"
        return tensors, None

    def __call__(self, index):
        """The outputs of the pool's pairs `index` (B,)."""
        return {key: value[index] for key, value in self.tensors.items()}
