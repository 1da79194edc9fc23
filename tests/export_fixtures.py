"""Tiny randomly initialised Co-DETR checkpoints for the export tests (no training needed)."""
from __future__ import annotations

from pathlib import Path

import torch

from codetr.data.labels import LabelMap
from codetr.model.builder import build_model
from codetr.spec import spec_from_dict, spec_to_dict

# The synthetic shapes' categories (codetr.data.synthetic): non-contiguous ids, 21 logits.
LABEL_MAP = LabelMap((3, 7, 11, 20), ("circle", "square", "triangle", "cross"), False, 21)


def tiny_model_dict(**model) -> dict:
    """`model` section of a ~0.3M-parameter Co-DETR: efficientvit_b0 trunk, 2 levels (strides 16,
    32), 20 queries."""
    return {"backbone": "efficientvit_b0", "num_feature_levels": 2, "return_interm_indices": [2, 3],
            "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "num_queries": 20,
            "dim_feedforward": 64, "dec_n_points": 2, "enc_n_points": 2, "num_select": 30,
            "dn_number": 4, "num_co_heads": 1, "co_head_num_convs": 1, **model}


def tao_sized_model_dict() -> dict:
    """TAO's default Co-DINO head on a ResNet-50 (4 levels, strides 8..64, 900 queries, 6+6 layers)."""
    return {"backbone": "resnet_50", "num_feature_levels": 4, "return_interm_indices": [1, 2, 3, 4],
            "hidden_dim": 256, "nheads": 8, "enc_layers": 6, "dec_layers": 6, "num_queries": 900,
            "dim_feedforward": 2048, "dec_n_points": 4, "enc_n_points": 4, "num_select": 300,
            "num_co_heads": 1}


def random_model(model_section: dict, seed: int = 0, num_classes: int = 21,
                 label_map: LabelMap = LABEL_MAP):
    """A randomly initialised detector (eval mode) and its spec.

    The class and box branches get random (not prior/zero) weights so that scores and boxes
    vary over queries: otherwise every query predicts its reference box and ties hide errors.
    Their scale is 1 / sqrt(fan-in) (unit-variance outputs), as in a trained model: larger
    box deltas saturate the sigmoid of the references, where inverse_sigmoid is ill-conditioned.
    """
    torch.manual_seed(seed)
    spec = spec_from_dict({"model": {**model_section, "pretrained_backbone_path": None},
                           "dataset": {"num_classes": num_classes, "contiguous_labels": label_map.contiguous,
                                       "augmentation": {"input_mean": [0.5, 0.5, 0.5],
                                                        "input_std": [0.5, 0.5, 0.5]}},
                           "train": {"activation_checkpoint": False}})
    model = build_model(spec, num_classes, load_pretrained_backbone=False).eval()
    with torch.no_grad():
        for branch in [*model.query_head.cls_branches, *model.query_head.reg_branches]:
            for p in branch.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
    return model, spec


def write_checkpoint(path: Path, model_section: dict, seed: int = 0, num_classes: int = 21,
                     label_map: LabelMap = LABEL_MAP):
    """`random_model` saved as a codetr checkpoint; returns (model, spec)."""
    model, spec = random_model(model_section, seed, num_classes, label_map)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"codetr": {"format_version": 1, "spec": spec_to_dict(spec), "label_map": label_map.to_dict()},
                "state_dict": state}, path)
    return model, spec
