"""`model_best.pth` and early stopping: what a run does with each validation's AP.

After every validation the callback ranks the AP of the weights a checkpoint would hand over
(`codetr.weights`: with `train.ema.final_weights: best` the better of the EMA and the raw weights
at that validation), logs one line, logs the ranked and best-so-far AP to the loggers, writes
`model_best.pth` (a full checkpoint, like `last.pth`, through the trainer's atomic checkpoint IO)
when the ranked AP beats every earlier validation, and stops the run after
`train.early_stopping_patience` validations in a row without such an improvement.

The best-so-far record and the count of non-improving validations travel in every checkpoint
(`codetr.best`, `codetr.early_stopping`), so a resumed run continues the count and never replaces
a better `model_best.pth` with a worse one (the file's own record is also read back on resume:
a run killed between writing `model_best.pth` and the epoch's `last.pth` keeps its best).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from codetr.tasks.checkpoint import CheckpointError, load_checkpoint

BEST = "model_best.pth"


class BestCheckpoint(L.Callback):
    """Keeps `<train_dir>/model_best.pth` and applies early stopping (see the module docstring).

    Args:
        train_dir: the run's folder.
        patience: stop after this many validations in a row without a better ranked AP
            (0 or None: never stop early).
        resumed: whether the run resumes from a checkpoint. A fresh run removes a
            `model_best.pth` an earlier run left in the folder, so it cannot be mistaken for this
            run's best; a resumed run keeps it and competes with it.

    Attributes:
        best: the best validation so far, `{epoch (completed epochs, 1-based), step (optimizer
            steps), weights ('ema' | 'raw'), AP, AP50}`, or None before the first validation.
        stale: validations in a row since the last improvement.
        stop_reason: why the run stopped early (None when it did not).
    """

    def __init__(self, train_dir: str, patience: Optional[int] = None, resumed: bool = False) -> None:
        self.path = os.path.join(train_dir, BEST)
        self.patience = int(patience or 0)
        self.resumed = resumed
        self.best: Optional[Dict[str, Any]] = None
        self.stale = 0
        self.stop_reason: Optional[str] = None
        self._seen = 0  # the module's validation count already handled

    # ---- resume ---------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        meta = checkpoint.get("codetr") or {}
        self.best = dict(meta["best"]) if meta.get("best") else None
        self.stale = int((meta.get("early_stopping") or {}).get("stale", 0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after any restore: validations counted so far belong to the checkpoint, not to this run
        self._seen = int(getattr(pl_module, "validations", 0))
        if not os.path.isfile(self.path):
            if self.best is not None:  # resumed into a folder without it (deleted, or another folder)
                _info(f"{self.path} is missing: the next validation writes it (the resumed "
                      f"checkpoint's best, AP {self.best['AP']:.4f} at epoch {self.best['epoch']}, "
                      "is not in this folder)")
                self.best = None
        elif not self.resumed:
            if trainer.is_global_zero:
                os.remove(self.path)
            _info(f"removed {self.path} of an earlier run in this folder (a fresh run, not a resume)")
        else:
            on_disk = read_best(self.path)
            if on_disk and (self.best is None or on_disk["AP"] > self.best["AP"]):
                self.best = on_disk  # written after the checkpoint we resumed from
        if self.patience and self.stale >= self.patience:
            self._stop(trainer, trainer.current_epoch, f"the resumed checkpoint had already gone {self.stale} validations "
                                f"without improvement (train.early_stopping_patience: {self.patience})")

    # ---- each validation ------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or int(getattr(pl_module, "validations", 0)) <= self._seen:
            return  # no COCO metrics were computed (no val ground truth)
        self._seen = pl_module.validations
        metrics = pl_module.val_metrics
        chosen = pl_module.final_weights()
        current = {"epoch": trainer.current_epoch + 1, "step": int(trainer.global_step),
                   "weights": chosen, "AP": float(metrics[chosen]["AP"]),
                   "AP50": float(metrics[chosen]["AP50"])}
        improved = self.best is None or current["AP"] > self.best["AP"]
        if improved:
            self.best, self.stale = current, 0
        else:
            self.stale += 1
        _info(validation_line(current, metrics, self.best))
        self._log_metrics(trainer, current)
        if improved:
            trainer.save_checkpoint(self.path, weights_only=False)
            _info(f"new best val AP {current['AP']:.4f} ({chosen} weights, epoch {current['epoch']}, "
                  f"step {current['step']}): wrote {self.path}")
        if self.patience and self.stale >= self.patience:
            self._stop(trainer, trainer.current_epoch + 1, f"the ranked val AP has not improved for {self.stale} validations "
                                f"(train.early_stopping_patience: {self.patience}); best "
                                f"{self.best['AP']:.4f} at epoch {self.best['epoch']}, in {self.path}")

    def _stop(self, trainer: L.Trainer, epochs_done: int, reason: str) -> None:
        # every rank decides alike (the metrics are broadcast); reduce anyway, as Lightning's
        # EarlyStopping does, so that no rank waits for the others forever
        if trainer.strategy.reduce_boolean_decision(True, all=False):
            trainer.should_stop = True
            self.stop_reason = reason
            _info(f"early stopping after epoch {epochs_done}: {reason}")

    def _log_metrics(self, trainer: L.Trainer, current: Dict[str, Any]) -> None:
        """`val_ranked/{AP,AP50,ema}` and `val_best/{AP,AP50,epoch}` (DVCLive: `val/ranked/*`,
        `val/best/*`) at the step of Lightning's own `val/*` series, so the curves align."""
        best = self.best or current
        values = {"val_ranked/AP": current["AP"], "val_ranked/AP50": current["AP50"],
                  "val_ranked/ema": float(current["weights"] == "ema"),
                  "val_best/AP": best["AP"], "val_best/AP50": best["AP50"],
                  "val_best/epoch": float(best["epoch"])}
        # Lightning logs epoch-end metrics at `_batches_that_stepped`; hooks after the epoch end
        # cannot call `self.log`, so the loggers are called directly with the same step.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            logger.save()

    # ---- checkpoint contents --------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        meta = checkpoint.setdefault("codetr", {})
        meta["best"] = dict(self.best) if self.best else None
        meta["early_stopping"] = {"patience": self.patience, "stale": self.stale,
                                  "stopped": self.stop_reason is not None}


def validation_line(current: Dict[str, Any], metrics: Dict[str, Dict[str, float]],
                    best: Optional[Dict[str, Any]]) -> str:
    """`validation epoch E step S: AP a AP50 b (ema), AP c AP50 d (raw); ranked: ema AP a; best: ...`."""
    parts = ", ".join(f"AP {m['AP']:.4f} AP50 {m['AP50']:.4f} ({tag})" for tag, m in metrics.items())
    line = (f"validation epoch {current['epoch']} step {current['step']}: {parts}; "
            f"ranked: {current['weights']} AP {current['AP']:.4f}")
    if best:
        line += f"; best: AP {best['AP']:.4f} at epoch {best['epoch']}"
    return line


def read_best(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The `codetr.best` record of a checkpoint (None when it has none or cannot be read)."""
    try:
        best = (load_checkpoint(path).get("codetr") or {}).get("best")
    except CheckpointError:
        return None
    return dict(best) if best else None


def _info(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, flush=True)
