"""The exponential moving average of a stage's trained weights, which train.py updates after each
step and swaps in to evaluate and export."""
import contextlib

import torch


@torch.no_grad()
def copy_into(tensors, values):
    for name, value in values.items():
        tensors[name].copy_(value)


class EMA:
    """Exponential moving average of the trained parameters (Polyak averaging, as LDM's LitEma):
        θ_ema ← d·θ_ema + (1 − d)·θ,   d = min(decay, (1 + n)/(10 + n)) after n updates,
    the warm-up letting early averages forget the random initialisation."""

    def __init__(self, module, decay):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, module):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, parameter in module.named_parameters():
            if name in self.shadow:  # a loop over tensors, not elements
                self.shadow[name].lerp_(parameter.detach(), 1 - decay)

    def state_dict(self):
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        copy_into(self.shadow, state["shadow"])

    @contextlib.contextmanager
    def applied(self, module):
        """Within the block the module carries the EMA weights; its own come back after."""
        parameters = dict(module.named_parameters())
        saved = {name: parameters[name].detach().clone() for name in self.shadow}
        copy_into(parameters, self.shadow)
        try:
            yield module
        finally:
            copy_into(parameters, saved)
