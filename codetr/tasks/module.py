"""The LightningModule: one training step, COCO validation, EMA and checkpoint contents.

The detector, criterion and post-processor are plain modules injected by `train.py`; this file
only runs them (Lightning examples' style). Contracts: docs/DESIGN.md.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning as L
import torch
from torch import nn

from codetr.data.test_padding import detection_sizes
from codetr.postprocess.postprocess import image_sizes
from codetr.data import Batch, LabelMap
from codetr.spec.schema import OptimConfig
from codetr.tasks.checkpoint import FORMAT_VERSION, capture_rng_state, restore_rng_state
from codetr.tasks.coco_eval import STAT_NAMES, evaluate_coco, to_coco_results
from codetr.tasks.ema import ModelEMA, auto_warmup_steps
from codetr.tasks.optim import (build_optimizer, build_param_groups, build_scheduler,
                                describe_groups, optional_steps)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CoDETRModule(L.LightningModule):
    """Trains `model` with `criterion`; validates with COCO metrics on original category ids.

    Args:
        model: `CoDETR` (or any module with its forward contract).
        criterion: outputs, targets -> dict of weighted loss terms (their sum is the loss).
        postprocess: outputs, orig_sizes `[B, 2]` -> per image {scores, labels, boxes xyxy px}.
        optim: `train.optim`.
        label_map: label index -> original category id and name.
        spec_dict: the resolved spec as plain data, stored in every checkpoint.
        clip_grad_norm: max L2 norm of the gradients (0: no clipping).
        ema_decay: EMA decay, None to disable EMA.
        ema_warmup_steps: EMA decay ramp (see `ModelEMA`); None: scaled to the run's length
            (`auto_warmup_steps`).
        ema_final_weights: 'best' | 'ema' | 'raw': the weights checkpoints hand to evaluate and
            inference (`codetr.weights`); 'best' picks by the last validation AP.
        vit_layer_decay: apply `optim.layer_decay_rate` to the backbone blocks.
        val_ground_truth: COCO ground truth dict of the validation split (None: no validation).
        verbose: print the parameter groups.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, postprocess: nn.Module,
                 optim: OptimConfig, label_map: LabelMap, spec_dict: Dict[str, Any],
                 clip_grad_norm: float = 0.0, ema_decay: Optional[float] = None,
                 ema_warmup_steps: Optional[int] = 0, ema_final_weights: str = "best",
                 vit_layer_decay: bool = False,
                 val_ground_truth: Optional[Dict[str, Any]] = None, verbose: bool = False) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.postprocess = postprocess
        self.optim_cfg = optim
        self.label_map = label_map
        self.spec_dict = spec_dict
        self.clip_grad_norm = clip_grad_norm
        self.vit_layer_decay = vit_layer_decay
        self.val_ground_truth = val_ground_truth
        self.verbose = verbose
        self.ema = ModelEMA(model, ema_decay, ema_warmup_steps or 0) if ema_decay is not None else None
        self._auto_ema_warmup = ema_warmup_steps is None
        self._schedule_origin = [0, 0]  # [epoch, step] this fit started from (on_train_start)
        self.ema_final_weights = ema_final_weights
        self._category_lut = label_map.category_id_lut()
        self._val_results: Dict[str, Dict[int, List[dict]]] = {}
        # Per validated weights ('ema', 'raw'): the last epoch's COCO stats.
        self.val_metrics: Dict[str, Dict[str, float]] = {}
        self.last_val_metrics: Dict[str, float] = {}
        self.best_val_ap = 0.0
        self.validations = 0

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, Any]:
        """Eval-mode predictions: `pred_logits` `[B, Q, C]`, `pred_boxes` `[B, Q, 4]` cxcywh."""
        return self.model(images, masks)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        outputs = self.model(batch.images, batch.masks, batch.targets)
        terms = self.criterion(outputs, batch.targets)
        loss = sum(terms.values())
        self._check_finite(loss, terms)
        n = len(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        if self._logger_writes_this_step():
            for name, value in terms.items():
                self.log(f"train/{name}", value.detach(), batch_size=n)
        return loss

    def _logger_writes_this_step(self) -> bool:
        """Whether Lightning hands this step's values to the logger (every `log_every_n_steps`
        optimizer steps; the values logged on other steps are dropped). The ~35 loss terms are
        logged only then: each `self.log` call costs ~0.6 ms, ~4% of a default CPU step."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _check_finite(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor]) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:  # every rank must stop, or the others wait forever
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach()):.4g} at step {self.global_step} (epoch "
                f"{self.current_epoch}); loss terms: {shown}. Try a lower train.optim.lr, "
                "train.optim.warmup_steps, train.clip_grad_norm > 0 or precision fp32.")

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            if self._auto_ema_warmup:
                total = optional_steps(self.trainer.estimated_stepping_batches)
                self.ema.warmup_steps = auto_warmup_steps(total)
                if self.trainer.is_global_zero:
                    print(f"EMA decay {self.ema.decay} with a warm-up ramp of {self.ema.warmup_steps} "
                          f"steps (train.ema.warmup_steps: null, scaled to the run's {total} steps)")

    def on_train_start(self) -> None:
        # After a resume's restore: the decay epochs count on from here at this run's steps per
        # epoch (another GPU count or batch size than the run that wrote the checkpoint).
        self._schedule_origin[:] = [self.current_epoch, self.global_step]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """L2-norm clipping at `clip_grad_norm`; FSDP clips through its own root module."""
        if self.clip_grad_norm <= 0:
            return
        wrapped = getattr(self.trainer.strategy, "model", None)
        if wrapped is not None and hasattr(wrapped, "clip_grad_norm_") \
                and type(wrapped).__name__ == "FullyShardedDataParallel":
            wrapped.clip_grad_norm_(self.clip_grad_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_grad_norm,
                                gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> Dict[str, Any]:
        groups = build_param_groups(self.model, self.optim_cfg, self.vit_layer_decay)
        if self.verbose:
            print("parameter groups:\n" + describe_groups(groups))
        # Fused AdamW under fp32 only: Lightning's mixed-precision plugins refuse to clip the
        # gradients of an optimizer that unscales them itself.
        full_precision = str(self.trainer.precision) in ("32-true", "32")
        optimizer = build_optimizer(groups, self.optim_cfg, allow_fused=full_precision)
        epochs = max(1, self.trainer.max_epochs or 1)
        steps_per_epoch = optional_steps(self.trainer.estimated_stepping_batches) // epochs
        scheduler = build_scheduler(optimizer, self.optim_cfg, max(1, steps_per_epoch),
                                    self._schedule_origin)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ---- validation -----------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights `val/*` reports: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def validated_models(self) -> List[tuple]:
        """(tag, module) of every set of weights validated: the EMA and the raw weights."""
        if self.ema is None:
            return [("raw", self.model)]
        return [("ema", self.ema.module), ("raw", self.model)]

    def final_weights(self) -> str:
        """'ema' | 'raw': what checkpoints hand to evaluate/inference (`train.ema.final_weights`)."""
        if self.ema is None:
            return "raw"
        if self.ema_final_weights != "best":
            return self.ema_final_weights
        ema, raw = self.val_metrics.get("ema"), self.val_metrics.get("raw")
        return "raw" if ema and raw and raw["AP"] > ema["AP"] else "ema"

    def on_validation_epoch_start(self) -> None:
        self._val_results = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        orig_sizes = detection_sizes(batch.targets)  # orig_size, or the LSJ canvas frame
        clip = image_sizes(batch.targets)  # boxes stay inside the image, as evaluate's
        for tag, model in self.validated_models():
            detections = self.postprocess(model(batch.images, batch.masks), orig_sizes, clip)
            results = self._val_results.setdefault(tag, {})
            for target, det in zip(batch.targets, detections):
                results[int(target["image_id"])] = to_coco_results(
                    int(target["image_id"]), det["scores"], det["labels"], det["boxes"], self._category_lut)

    def on_validation_epoch_end(self) -> None:
        if self.val_ground_truth is None or self.trainer.sanity_checking:
            return
        primary = self.validated_models()[0][0]
        for tag, _ in self.validated_models():
            results = self._gather(self._val_results.get(tag, {}))
            metrics = None
            if self.trainer.is_global_zero:
                m = evaluate_coco(self.val_ground_truth, [d for dets in results.values() for d in dets],
                                  image_ids=sorted(results))
                metrics = m.stats
            metrics = self.trainer.strategy.broadcast(metrics, src=0)
            self.val_metrics[tag] = dict(metrics)
            self.best_val_ap = max(self.best_val_ap, float(metrics["AP"]))
            prefix = "val" if tag == primary else f"val_{tag}"
            for name in STAT_NAMES:
                self.log(f"{prefix}/{name}", float(metrics[name]),
                         prog_bar=tag == primary and name in ("AP", "AP50"),
                         sync_dist=True)  # equal on every rank: the mean changes nothing
        self.last_val_metrics = self.val_metrics[primary]
        self.validations += 1

    def _gather(self, results: Dict[int, List[dict]]) -> Dict[int, List[dict]]:
        """All ranks' detections by image id; the distributed sampler repeats a few images to
        even out the ranks, so the first copy of an image wins."""
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return results
        everyone: List[Optional[Dict[int, List[dict]]]] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(everyone, results)
        merged: Dict[int, List[dict]] = {}
        for part in everyone:
            for image_id, dets in (part or {}).items():
                merged.setdefault(image_id, dets)
        return merged

    # ---- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # update, not replace: callbacks (BestCheckpoint) add their records first
        checkpoint.setdefault("codetr", {}).update(
            {"format_version": FORMAT_VERSION, "spec": self.spec_dict,
             "label_map": self.label_map.to_dict(), "weights": self.final_weights(),
             "validation": {tag: dict(m) for tag, m in self.val_metrics.items()},
             "best_val_ap": self.best_val_ap, "validations": self.validations})
        checkpoint["rng"] = capture_rng_state()
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint.pop("hyper_parameters", None)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        meta = checkpoint.get("codetr") or {}
        self.val_metrics = {tag: dict(m) for tag, m in (meta.get("validation") or {}).items()}
        self.best_val_ap = float(meta.get("best_val_ap", 0.0))
        self.validations = int(meta.get("validations", 0))
        if self.ema is not None:
            if "ema" in checkpoint:
                self.ema.load_state_dict(checkpoint["ema"])
            else:  # EMA switched on mid-run: start the average from the restored weights
                self.ema.module.load_state_dict(
                    {k[len("model."):]: v for k, v in checkpoint["state_dict"].items()
                     if k.startswith("model.")})
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"])
