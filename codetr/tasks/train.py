"""`codetr train`: build everything from the spec, then fit with Lightning.

Outputs in `<results_dir>/train` (`spec.task_results_dir("train")`):
`model_epoch_<NNN>.pth` every `checkpoint_interval` epochs (NNN = 0-based epoch), `last.pth`
after every epoch, `model_best.pth` (the best validation so far, `best_checkpoint.py`), the final
`codetr_model.pth`, `experiment_spec.yaml` and the logs (`dvclive/`, or `csv/` when DVCLive
cannot run). A rerun with the same results_dir resumes from `last.pth`;
`train.resume_training_checkpoint_path` overrides it.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import List, Optional

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn

from codetr.data import LabelMap, build_label_map, load_split_sources
from codetr.errors import InputValueError, MissingInputError, OutOfMemoryAdviceError
from codetr.fileio import atomic_write_bytes, remove_stale_temp_files
from codetr.spec import ExperimentSpec, SpecError, spec_to_dict
from codetr.spec.load import save_spec
from codetr.tasks.best_checkpoint import BEST, BestCheckpoint
from codetr.tasks.checkpoint import (AtomicCheckpointIO, load_checkpoint, load_partial, require_checkpoint_file,
                                     model_state_dict, require_same_architecture)
from codetr.tasks.datamodule import CoDETRDataModule
from codetr.tasks.epoch_checkpoint import checkpoint_callback
from codetr.tasks.loggers import build_logger
from codetr.tasks.module import CoDETRModule
from codetr.tasks.optim import freeze_parameters
from codetr.tasks.run_lock import RunLock
from codetr.zoo.restore import adapt_for_finetuning
from codetr.tasks.runtime import Runtime, activation_checkpoint_rule, ensure_writable_dir, resolve_runtime

LAST = "last.pth"
FINAL = "codetr_model.pth"
OOM_ADVICE = ("out of memory. Reduce the memory per step: a smaller dataset.batch_size, "
              "train.activation_checkpoint: true, dataset.augmentation.fixed_padding: false, "
              "fewer model.num_queries, or a lower resolution (dataset.augmentation.scales, "
              "random_resize_max_size, fixed_random_crop)")


def run(spec: ExperimentSpec) -> int:
    """Trains the model of `spec` (one run per results folder at a time); returns 0."""
    train_dir = spec.task_results_dir("train")
    if spec.train.is_dry_run:
        return _train(spec, train_dir)
    ensure_writable_dir(train_dir, "train results directory")
    with RunLock(train_dir) as lock:
        if lock.held:  # no other run writes here now: temporaries there are a killed run's
            remove_stale_temps(train_dir)
        return _train(spec, train_dir)


def remove_stale_temps(train_dir: str) -> None:
    """Removes (with a notice) the temporaries that killed atomic writes left in `train_dir`
    (checkpoints, logs in its subfolders): each is as large as its file, and DVC would cache them."""
    removed = remove_stale_temp_files(train_dir, recursive=True)
    if removed:
        _info(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
              + ", ".join(str(p) for p in removed))


def _train(spec: ExperimentSpec, train_dir: str) -> int:
    from codetr.model.builder import build_criterion, build_model, build_postprocess

    L.seed_everything(spec.train.seed, workers=True, verbose=False)
    runtime = resolve_runtime(spec.train.num_gpus, spec.train.gpu_ids, spec.train.num_nodes,
                              spec.train.precision, spec.train.distributed_strategy)
    spec, notice = activation_checkpoint_rule(spec, runtime.world_size)
    if notice:
        _info(notice)
    sources = load_split_sources(spec, "train")
    require_boxes(sources)
    label_map = build_label_map(spec, train_sources=sources)
    model = build_model(spec, label_map.num_classes)
    if spec.train.pretrained_model_path and not find_resume_checkpoint(spec, train_dir):
        load_pretrained(model, spec.train.pretrained_model_path)
    if spec.train.freeze:
        frozen = freeze_parameters(model, spec.train.freeze)
        _info("frozen: " + ", ".join(f"{p} ({n} tensors)" for p, n in frozen.items()))
    datamodule = CoDETRDataModule(spec, label_map, train_sources=sources)
    return fit(spec, model, build_criterion(spec, label_map.num_classes), build_postprocess(spec),
               datamodule, label_map, runtime, train_dir)


def fit(spec: ExperimentSpec, model: nn.Module, criterion: nn.Module, postprocess: nn.Module,
        datamodule: CoDETRDataModule, label_map: LabelMap, runtime: Runtime, train_dir: str,
        log_every_n_steps: int = 10) -> int:
    """Runs Lightning's fit loop with codetr's checkpoints, logging and failure messages.

    Args:
        spec: the experiment spec (`train` is read; the whole spec goes into checkpoints).
        model, criterion, postprocess: see `CoDETRModule`.
        datamodule: the data (its `setup('fit')` is called here for the val ground truth).
        label_map: stored in checkpoints.
        runtime: devices, strategy and precision (`resolve_runtime`).
        train_dir: where checkpoints and logs go.
        log_every_n_steps: how often per-step train metrics are logged.
    """
    t = spec.train
    dry = t.is_dry_run
    quiet_lightning_noise()
    for notice in runtime.notices:
        _info(notice)
    if t.enable_ema and t.distributed_strategy == "fsdp" and runtime.world_size > 1:
        raise SpecError("train.enable_ema is not supported with distributed_strategy fsdp "
                         "(the average would need the full, unsharded weights); use ddp")
    resume = None if dry else find_resume_checkpoint(spec, train_dir)
    if resume:
        state, _ = model_state_dict(load_checkpoint(resume, require_codetr=False), prefer_ema=False)
        require_same_architecture(model, state, resume)
        _info(f"resuming from {resume}")
    datamodule.setup("fit")
    has_val = datamodule.has_val()
    module = CoDETRModule(
        model, criterion, postprocess, t.optim, label_map, spec_to_dict(spec),
        clip_grad_norm=t.clip_grad_norm, ema_decay=t.ema.decay if t.enable_ema else None,
        ema_warmup_steps=t.ema.warmup_steps, ema_final_weights=t.ema.final_weights, vit_layer_decay=spec.model.backbone.startswith("vit"),
        val_ground_truth=datamodule.ground_truth("val") if has_val else None, verbose=t.verbose)
    callbacks: List[L.Callback] = []
    logger = False
    best = BestCheckpoint(train_dir, t.early_stopping_patience, resumed=resume is not None)
    if not dry:
        callbacks += [best, checkpoint_callback(train_dir, t.checkpoint_interval)]
        logger = build_logger(train_dir, resume=resume is not None)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        accelerator=runtime.accelerator, devices=runtime.devices, strategy=runtime.strategy,
        num_nodes=runtime.num_nodes, precision=runtime.precision, max_epochs=t.num_epochs,
        check_val_every_n_epoch=t.validation_interval, num_sanity_val_steps=0,
        limit_val_batches=None if has_val else 0, plugins=[AtomicCheckpointIO()],
        logger=logger, callbacks=callbacks, default_root_dir=train_dir,
        enable_checkpointing=not dry, fast_dev_run=2 if dry else False,
        log_every_n_steps=log_every_n_steps, enable_model_summary=False)
    if not dry and trainer.is_global_zero:
        save_spec(spec, train_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except torch.OutOfMemoryError as err:
        raise OutOfMemoryAdviceError(f"training ran {OOM_ADVICE}") from err
    if dry:
        _info("dry run: the spec, data, model and 2 train/val batches work; nothing was written")
        return 0
    # weights_only=False: the full state (optimizer, loops), so the final file can resume too.
    trainer.save_checkpoint(os.path.join(train_dir, FINAL), weights_only=False)
    if trainer.is_global_zero and not os.path.isfile(best.path):
        # no validation ran: model_best.pth is then the final model (record `codetr.best: null`),
        # so that a pipeline reading model_best.pth works with any data and validation_interval
        with open(os.path.join(train_dir, FINAL), "rb") as f:
            atomic_write_bytes(best.path, f.read())
        _info(f"no validation ran (no val data, or validation_interval > num_epochs): {BEST} "
              f"is a copy of {FINAL}")
    report_end(module, os.path.join(train_dir, FINAL), best)
    return 0


def report_end(module: CoDETRModule, final_path: str, best: Optional[BestCheckpoint] = None) -> None:
    """The last lines of a run: the last validation, which weights were saved and why, the best
    validation (model_best.pth) and why the run stopped early, and a warning as the very last
    line when validation AP never left zero."""
    for tag, metrics in module.val_metrics.items():
        _info(f"last validation ({tag} weights): "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if module.ema is not None:
        chosen = module.final_weights()
        why = ("the better AP on the last validation (train.ema.final_weights: best)"
               if module.ema_final_weights == "best" and len(module.val_metrics) == 2
               else f"train.ema.final_weights: {module.ema_final_weights}")
        _info(f"{final_path} hands the {chosen} weights to evaluate/inference ({why})")
    if best is not None and best.best:
        b = best.best
        _info(f"{best.path}: epoch {b['epoch']}, step {b['step']}, {b['weights']} weights, "
              f"val AP {b['AP']:.4f} AP50 {b['AP50']:.4f}")
    if best is not None and best.stop_reason:
        _info(f"the run stopped early: {best.stop_reason}")
    if module.validations and module.best_val_ap <= 0.0:
        where = f"all {module.validations} validations" if module.validations > 1 else "its only validation"
        _info(f"warning: validation AP stayed 0.000 in {where}: the "
              "model has not learned to detect yet. Train longer (train.num_epochs), check the "
              "learning rate and warm-up, the labels (dataset.num_classes, contiguous_labels) and "
              "that the validation set matches the training classes")


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning_noise() -> None:
    """Silences what informs nobody in a codetr run, keeps every other message.

    - Lightning's advertisement for its cloud logger (printed on every run);
    - "Checkpoint directory ... exists and is not empty": the train folder always holds our own
      files (the spec, the lock, logs), and a `last.pth` there is resumed on purpose;
    - torch's pytree `LeafSpec` deprecation raised inside Lightning, not in our code.
    """
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropLitLoggerTip) for f in handler.filters):
            handler.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def require_boxes(sources) -> None:
    """A training set without a single (non-crowd) box would train to exit 0 and learn nothing."""
    if sum(int((~s.iscrowd).sum()) for s in sources) == 0:
        files = ", ".join(s.json_file for s in sources)
        images = sum(len(s) for s in sources)
        raise InputValueError(f"the training set has no boxes ({images} images, 0 non-crowd "
                              f"annotations in {files}): a detector cannot learn from negatives "
                              "alone; check dataset.train_data_sources")


def find_resume_checkpoint(spec: ExperimentSpec, train_dir: str) -> Optional[str]:
    """`train.resume_training_checkpoint_path` when set (must exist), else `<train_dir>/last.pth`
    when present (auto-resume), else None."""
    explicit = spec.train.resume_training_checkpoint_path
    if explicit:
        if not os.path.isfile(explicit):
            raise MissingInputError(f"train.resume_training_checkpoint_path {explicit} does not exist")
        return explicit
    last = os.path.join(train_dir, LAST)
    return last if os.path.isfile(last) else None


def load_pretrained(model: nn.Module, path: str) -> None:
    """Starts from another checkpoint's weights where names and shapes match; reports the rest."""
    require_checkpoint_file(path, "train.pretrained_model_path")
    ckpt = load_checkpoint(path, require_codetr=False)
    state, which = model_state_dict(ckpt)
    state = adapt_for_finetuning(state, model, path, ckpt)  # official mmdet / Sense-X names
    report = load_partial(model, state)
    if not report.loaded:
        raise InputValueError(f"train.pretrained_model_path {path}: no tensor matches the model by name "
                         f"and shape; is it a Co-DETR checkpoint?\n{report.summary()}")
    _info(f"pretrained weights ({which}) from {path}:\n{report.summary()}")


def _info(message: str) -> None:
    """Prints on the first process only (every DDP process runs this module)."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)
