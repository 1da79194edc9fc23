"""The tiny official Co-DINO of ../shared/reference/mmdet-codino as a codetr spec, and helpers."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from codetr.boxes import box_xyxy_to_cxcywh
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
# The co-heads' 6 maps: the 5 encoder levels and the extra downsampled one (strides in pixels).
CO_HEAD_STRIDES = [4, 8, 16, 32, 64, 128]
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


@functools.lru_cache(maxsize=8)
def reference_file(folder: str, name: str):
    """One file of the reference folder (`rcnn_inputs.pth`, `train_losses.pth`, ...), cached."""
    return torch.load(Path(folder) / name, map_location="cpu", weights_only=True)


def reference_targets(inputs: dict) -> list[dict]:
    """DESIGN.md targets of the reference's fixed ground truth (`rcnn_inputs.pth`).

    Returns:
        Per image `{"boxes": [N, 4] cxcywh normalised by the unpadded `img_shape`, "labels": [N],
        "size": [h, w]}`.
    """
    out = []
    for boxes, labels, (h, w) in zip(inputs["gt_bboxes"], inputs["gt_labels"], inputs["img_shape"]):
        out.append({"boxes": box_xyxy_to_cxcywh(boxes / torch.tensor([w, h, w, h])), "labels": labels,
                    "size": torch.tensor([h, w])})
    return out
