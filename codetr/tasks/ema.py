"""Exponential moving average of a model's weights (RT-DETR's `ModelEMA`), updated every step."""
from __future__ import annotations

import copy
import math
from typing import Dict

import torch
from torch import nn


def auto_warmup_steps(total_steps: int) -> int:
    """The decay ramp's time constant for a run of `total_steps` optimizer steps.

    With the ramp `d_t = decay * (1 - exp(-t / tau))` the average forgets the random
    initialisation within the first steps whatever `tau` is; `tau` sets how long the average
    spans at the end, about `1 / (1 - d_T)` steps with `1 - d_T ~ (1 - decay) + exp(-T / tau)`.
    `tau = T / ln(T / 10)` makes that about a tenth of the run (or `1 / (1 - decay)` steps if
    shorter): ~24 steps of a 240-step fine-tuning, the full decay over 100k steps. Without a ramp
    such a short run would save weights that are still 0.999^240 = 79% the initialisation.
    """
    total_steps = max(1, int(total_steps))
    return max(1, round(total_steps / max(1.0, math.log(total_steps / 10.0))))


class ModelEMA:
    """Keeps `ema = d * ema + (1 - d) * weights` for every floating-point parameter and buffer.

    The decay ramps up as `decay * (1 - exp(-updates / warmup_steps))` when `warmup_steps > 0`, so
    the average does not remember the random initialisation for long (RT-DETR's warm-up rule).
    Integer buffers (e.g. BatchNorm's `num_batches_tracked`) are copied, not averaged.

    The copy is deliberately NOT an `nn.Module` attribute of the LightningModule: DDP/FSDP would
    otherwise wrap, shard and broadcast it like a trainable part of the model.

    Args:
        model: the model to average (its current weights initialise the average).
        decay: the target decay in (0, 1].
        warmup_steps: the time constant of the decay ramp (0: constant decay).
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1], got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay that the next `update` uses."""
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards `model`'s current weights (same architecture)."""
        d = self.current_decay()
        current = model.state_dict()
        averages, targets = [], []
        for name, avg in self.module.state_dict().items():
            new = current[name].detach().to(device=avg.device)
            if avg.dtype.is_floating_point:
                averages.append(avg)
                targets.append(new.to(avg.dtype))
            else:
                avg.copy_(new)
        if averages:
            # avg += (1 - d) * (new - avg) in one multi-tensor kernel: a per-tensor loop of small
            # ops cost ~25 ms per step for the default 4.5M-parameter CPU model.
            torch._foreach_lerp_(averages, targets, 1.0 - d)
        self.updates += 1

    def to(self, device: torch.device | str) -> "ModelEMA":
        """Moves the averaged copy to `device`."""
        self.module.to(device)
        return self

    def state_dict(self) -> Dict[str, object]:
        """Plain data for a checkpoint: {'updates', 'decay', 'warmup_steps', 'state_dict'}."""
        return {
            "updates": self.updates,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores what `state_dict` returned (strict: same architecture)."""
        self.module.load_state_dict(state["state_dict"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[arg-type]
