"""How far timm's Swin is from mmdet's on the reference weights (why codetr/model/swin.py exists).

Loads ../shared/reference/mmdet-codino/swin_state_dict.pth (a small mmdet SwinTransformer with
Swin-L's options) into (a) codetr's SwinTransformer and (b) a timm SwinTransformer of the same
size, with the keys renamed and the patch-merging weights permuted to timm's concat order, and
prints max |diff| per level against mmdet's outputs. timm has no per-level norms, so mmdet's
``norm{i}`` is applied to timm's levels: the most favourable comparison for timm.

    PYTHONPATH=. .venv/bin/python bench/swin_timm_gap.py
"""
import re
from pathlib import Path

import timm
import torch

from codetr.model.swin import SwinTransformer

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "mmdet-codino"
_UNFOLD_TO_CONCAT = [0, 2, 1, 3]  # an involution: the same permutation undoes concat -> unfold


def mmdet_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet Swin names -> timm >= 0.9 names (merging at the start of the next stage)."""
    out = {}
    for key, value in state.items():
        if key.startswith("norm") or key.endswith("relative_position_index"):
            continue
        key = key.replace("patch_embed.projection.", "patch_embed.proj.")
        key = key.replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.")
        key = key.replace("ffn.layers.1.", "mlp.fc2.")
        match = re.match(r"stages\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
            if value.dim() == 2:
                c_out, c4 = value.shape
                value = value.reshape(c_out, c4 // 4, 4)[:, :, _UNFOLD_TO_CONCAT].transpose(1, 2)
                value = value.reshape(c_out, c4)
            else:
                value = value.reshape(-1, 4)[:, _UNFOLD_TO_CONCAT].transpose(0, 1).reshape(-1)
        out[key.replace("stages.", "layers.")] = value
    return out


def main() -> None:
    torch.set_num_threads(1)
    state = {k: v.float() if v.is_floating_point() else v for k, v in
             torch.load(REFERENCE / "swin_state_dict.pth", weights_only=True).items()}
    images = torch.load(REFERENCE / "swin_inputs.pth", weights_only=True)["images"]
    expected = torch.load(REFERENCE / "swin_outputs.pth", weights_only=True)
    ours = SwinTransformer(16, (2, 2, 2, 2), (1, 2, 4, 8), 12).eval()
    ours.load_state_dict(state)
    theirs = timm.create_model("swin_large_patch4_window12_384", pretrained=False, embed_dim=16,
                               depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), img_size=384,
                               strict_img_size=False, num_classes=0).eval()
    missing, unexpected = theirs.load_state_dict(mmdet_to_timm(state), strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias"}, (missing,
                                                                                   unexpected)
    norms = [ours.norm0, ours.norm1, ours.norm2, ours.norm3]
    for name, x in images.items():
        x = x.float()
        with torch.no_grad():
            mine = ours(x)
            t = theirs.patch_embed(x)
            levels = []
            for stage, norm in zip(theirs.layers, norms):
                t = stage(t)
                levels.append(norm(t).permute(0, 3, 1, 2))
        ref = expected[name]
        print(f"{name}: codetr " + " / ".join(f"{(a - b).abs().max():.1e}" for a, b in
                                             zip(mine, ref))
              + "   timm " + " / ".join(f"{(a - b).abs().max():.2g}" for a, b in
                                        zip(levels, ref)))


if __name__ == "__main__":
    main()
