"""The tiny official Co-DINO of ../shared/reference/mmdet-codino as a codetr spec, and helpers."""
from __future__ import annotations

from pathlib import Path

import torch

from codetr.model.builder import build_model
from codetr.spec.load import spec_from_dict

# The codetr spec of the reference's tiny model (its README, "Gap to codetr"): ResNet-18, width 64,
# 2 encoder / 3 decoder layers, 30 queries, 5 levels, 5 classes, one ATSS co-head with one conv.
TINY_SPEC = {
    "model": {
        "backbone": "resnet_18", "return_interm_indices": [0, 1, 2, 3, 4], "num_feature_levels": 5,
        "hidden_dim": 64, "nheads": 8, "enc_layers": 2, "dec_layers": 3, "dim_feedforward": 128,
        "enc_n_points": 4, "dec_n_points": 4, "num_queries": 30, "num_select": 100,
        "dn_number": 20, "two_stage_type": "standard", "embed_init_tgt": True,
        "decoder_sa_type": "sa", "pe_temperatureH": 20, "pe_temperatureW": 20,
        "num_co_heads": 1, "co_head_num_convs": 1, "soft_nms_enabled": True,
        "soft_nms_method": "linear", "soft_nms_iou_threshold": 0.8, "soft_nms_sigma": 0.5,
    },
    "dataset": {"num_classes": 5, "contiguous_labels": True},
}
NUM_CLASSES = 5
# The same folder as the `mmdet_reference` fixture of conftest.py (module-scoped fixtures here).
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mmdet-codino"


def tiny_spec(**model_overrides):
    """The tiny spec, with `model` keys replaced."""
    data = {"model": {**TINY_SPEC["model"], **model_overrides}, "dataset": dict(TINY_SPEC["dataset"])}
    return spec_from_dict(data, origin="tiny official spec")


def tiny_model(**model_overrides) -> torch.nn.Module:
    """A freshly initialised codetr model of the tiny spec (eval mode)."""
    torch.manual_seed(0)
    return build_model(tiny_spec(**model_overrides), NUM_CLASSES, load_pretrained_backbone=False).eval()


def plain_state_dict(reference: Path) -> dict:
    """tiny_state_dict.pth: the fp16 official weights (int64 counters), as the reference ran them."""
    return torch.load(reference / "tiny_state_dict.pth", map_location="cpu", weights_only=True)
