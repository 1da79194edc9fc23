"""Writes a checkpoint's weights without its trunk: a `train.pretrained_model_path` that
initialises the neck, transformer and heads from a trained model and leaves the trunk to
`model.pretrained_backbone_path` (BENCHMARKS.md "Fine-tuning recipe on coco128 person",
detection pre-training on the synthetic shapes).

    python bench/strip_trunk.py results/train/codetr_model.pth runs/shapes_transformer.pth

The EMA weights are taken when the checkpoint has them (`model_state_dict`); tensors whose shape
differs in the new model (the class layers of another `num_classes`) are skipped at load time
and reported there.
"""
from __future__ import annotations

import argparse

from codetr.fileio import atomic_torch_save
from codetr.tasks.checkpoint import load_checkpoint, model_state_dict

TRUNK = "backbone."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a codetr checkpoint (.pth)")
    parser.add_argument("out", help="the weights without the trunk (.pth)")
    args = parser.parse_args(argv)
    state, which = model_state_dict(load_checkpoint(args.checkpoint, require_codetr=False))
    kept = {k: v for k, v in state.items() if not k.startswith(TRUNK)}
    if len(kept) == len(state):
        raise SystemExit(f"{args.checkpoint}: no '{TRUNK}*' tensor: not a codetr model?")
    atomic_torch_save({"state_dict": kept}, args.out)
    print(f"{args.out}: {len(kept)} of {len(state)} tensors ({which} weights), trunk left out")


if __name__ == "__main__":
    main()
