"""Our FAN against NVIDIA TAO's FAN (DINO backbone), given a TAO checkout: names, counts, outputs.

For each size, TAO's ``fan_model_dict[name]`` and our ``build_fan(name)`` are built, every tensor
of TAO's state dict is replaced by a random one (BatchNorm variances positive) and loaded into
both by name (strict: the names must be identical), and the four levels are compared on one
random 128x192 batch in eval mode, and in train mode (drop path, BatchNorm batch statistics)
under the same seed. TAO's ``LayerNorm2d`` takes a second branch when its input is not contiguous
in memory (``torch.var_mean``, unbiased variance) where every other path, ours included, uses the
biased variance of a LayerNorm; on the CPU the depthwise conv's output is such a tensor, so by
default the check forces TAO's contiguous branch (``--tao-noncontiguous-branch`` keeps it).

TAO's code is not part of this repository: point ``--tao-root`` at a checkout of
NVIDIA/tao_pytorch_backend that has ``nvidia_tao_pytorch/cv/dino/model/fan.py`` importing
``cv/backbone/fan.py`` and ``cv/backbone/convnext_utils.py`` (e.g. commit 191babf); add empty
``__init__.py`` files where that tree has none.

    .venv/bin/python bench/fan_tao_check.py --tao-root /path/to/tao_pytorch_backend
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codetr.model.fan import FAN_ARCHS, build_fan  # noqa: E402


def random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the same names and shapes (std 0.05; BN variances in [0.75, 1.25])."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) * 0.5 + 0.75
        else:
            out[key] = torch.randn(value.shape, generator=g) * 0.05
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tao-root", required=True)
    parser.add_argument("--tao-noncontiguous-branch", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, args.tao_root)
    from nvidia_tao_pytorch.cv.backbone import convnext_utils
    from nvidia_tao_pytorch.cv.dino.model import fan as tao_fan
    if not args.tao_noncontiguous_branch:
        convnext_utils._is_contiguous = lambda tensor: True
    for name in FAN_ARCHS:
        torch.manual_seed(0)
        ref = tao_fan.fan_model_dict[name](out_indices=[0, 1, 2, 3], activation_checkpoint=False)
        ours = build_fan(name, (0, 1, 2, 3))
        state = random_like(ref.state_dict(), seed=1)
        ref.load_state_dict(state, strict=True)
        ours.load_state_dict(state, strict=True)  # identical names and shapes, or this raises
        count = sum(p.numel() for p in ours.parameters())
        x = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(2))
        diffs = {}
        for mode in ("eval", "train"):
            ref.train(mode == "train")
            ours.train(mode == "train")
            with torch.no_grad():
                torch.manual_seed(5)
                r = list(ref(x).values())
                torch.manual_seed(5)
                o = ours(x)
            diffs[mode] = [float((a - b).abs().max()) for a, b in zip(r, o)]
        print(f"{name}: {len(state)} tensors, {count} parameters (TAO "
              f"{sum(p.numel() for p in ref.parameters())}); max |diff| per level "
              f"eval {['%.2g' % d for d in diffs['eval']]} train {['%.2g' % d for d in diffs['train']]}")


if __name__ == "__main__":
    main()
