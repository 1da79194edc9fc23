"""Spec -> Lightning accelerator, devices, strategy, precision and node count.

No GPU: everything runs on the CPU with a one-line notice; `num_gpus > 1` then means that many
CPU processes (DDP over gloo), which is how multi-process training is tested without GPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

from codetr.errors import UnwritableOutputError
from codetr.spec.errors import SpecError

PRECISIONS = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


@dataclass
class Runtime:
    """Arguments for `lightning.Trainer` and what was decided on the way.

    Attributes:
        accelerator: 'cpu' or 'gpu'.
        devices: a device count (CPU) or a list of CUDA indices (GPU).
        strategy: 'auto', or a Lightning strategy object for several processes.
        precision: a Lightning precision flag ('32-true', '16-mixed', 'bf16-mixed').
        num_nodes: machines taking part.
        world_size: processes in all (devices x nodes).
        notices: one-line messages for the user (CPU fallback, precision changes).
    """
    accelerator: str
    devices: Union[int, List[int]]
    strategy: object
    precision: str
    num_nodes: int
    world_size: int
    notices: List[str] = field(default_factory=list)


def reconcile_gpus(num_gpus: int, gpu_ids: Sequence[int], task: str = "train",
                   notices: Optional[List[str]] = None) -> tuple[int, List[int]]:
    """TAO's rule for inconsistent `<task>.num_gpus` and `<task>.gpu_ids`: both follow the setting
    with more GPUs (num_gpus = 1, gpu_ids = [0, 1] -> num_gpus = 2).

    A longer `num_gpus` extends `gpu_ids` with the lowest indices not listed yet (so TAO's
    default `[0]` with `num_gpus: 4` gives `[0, 1, 2, 3]`). A one-line notice says what changed,
    except for that default, which is how TAO's specs ask for N GPUs.

    Returns:
        (num_gpus, gpu_ids), consistent.
    """
    ids = list(gpu_ids)
    if len(ids) == num_gpus:
        return num_gpus, ids
    count = max(num_gpus, len(ids))
    free = (i for i in range(count + len(ids)) if i not in ids)
    new_ids = ids + [next(free) for _ in range(count - len(ids))]
    if notices is not None and ids != [0]:
        notices.append(f"notice: {task}.num_gpus={num_gpus} and {task}.gpu_ids={ids} disagree: "
                       f"following the setting with more GPUs (TAO's rule), {task}.num_gpus="
                       f"{count}, {task}.gpu_ids={new_ids}")
    return count, new_ids


def resolve_devices(num_gpus: int, gpu_ids: Sequence[int], cuda_count: int,
                    notices: List[str], task: str = "train") -> tuple[str, Union[int, List[int]]]:
    """Picks the accelerator and devices; `cuda_count` is `torch.cuda.device_count()`."""
    num_gpus, ids = reconcile_gpus(num_gpus, gpu_ids, task, notices)
    if cuda_count == 0:
        notices.append(f"No GPU found: running on the CPU with {num_gpus} process"
                       f"{'es' if num_gpus > 1 else ''}.")
        return "cpu", num_gpus
    bad = [i for i in ids if i >= cuda_count]
    if bad:
        raise SpecError(f"{task}.gpu_ids {bad} do not exist: this machine has {cuda_count} GPU(s) "
                        f"(indices 0..{cuda_count - 1})")
    return "gpu", ids


def resolve_precision(precision: str, accelerator: str, notices: List[str]) -> str:
    """Maps fp32|fp16|bf16 to Lightning's flag; fp16 AMP does not exist on the CPU -> bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported (fp32, fp16, bf16)")
    if precision == "fp16" and accelerator == "cpu":
        notices.append("precision fp16 is not available on the CPU: using bf16 mixed precision.")
        return PRECISIONS["bf16"]
    if precision == "bf16" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise SpecError("precision bf16 needs a GPU with bfloat16 support (Ampere or newer); "
                         "use fp16 or fp32")
    return PRECISIONS[precision]


def build_strategy(name: str, world_size: int, accelerator: str) -> object:
    """'auto' for one process, else DDP (gloo on CPU, NCCL on GPU) or FSDP (full state dicts)."""
    if world_size <= 1:
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Co-DETR's training-only branches can leave a parameter without a gradient in a step
        # (e.g. no positive sample for a co-head): DDP must not wait for it.
        return DDPStrategy(find_unused_parameters=True,
                           process_group_backend="gloo" if accelerator == "cpu" else None)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # Full (rank-0 gathered) state dicts keep checkpoints single files loadable anywhere.
        return FSDPStrategy(state_dict_type="full")
    raise ValueError(f"distributed_strategy={name!r} is not supported (ddp, fsdp)")


def resolve_runtime(num_gpus: int, gpu_ids: Sequence[int], num_nodes: int, precision: str,
                    distributed_strategy: str, cuda_count: Optional[int] = None,
                    task: str = "train") -> Runtime:
    """Everything `lightning.Trainer` needs to place the run.

    Args:
        num_gpus: processes per node (GPUs, or CPU processes without a GPU).
        gpu_ids: CUDA indices to use (ignored on CPU).
        num_nodes: machines.
        precision: 'fp32', 'fp16' or 'bf16'.
        distributed_strategy: 'ddp' or 'fsdp'.
        cuda_count: override for `torch.cuda.device_count()` (tests).
        task: the spec section the values come from, for the messages (`train.num_gpus`).
    """
    notices: List[str] = []
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    accelerator, devices = resolve_devices(num_gpus, gpu_ids, count, notices, task)
    flag = resolve_precision(precision, accelerator, notices)
    per_node = devices if isinstance(devices, int) else len(devices)
    world = per_node * num_nodes
    if distributed_strategy == "fsdp" and accelerator == "cpu" and world > 1:
        notices.append("distributed_strategy fsdp needs GPUs: using ddp on the CPU.")
        distributed_strategy = "ddp"
    strategy = build_strategy(distributed_strategy, world, accelerator)
    return Runtime(accelerator=accelerator, devices=devices, strategy=strategy, precision=flag,
                   num_nodes=num_nodes, world_size=world, notices=notices)


def ensure_writable_dir(path: str, what: str) -> None:
    """Creates `path` and proves it writable now, before hours of work depend on it.

    Raises:
        PermissionError: naming `what` (e.g. 'train results directory') and the reason.
    """
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as err:
        raise UnwritableOutputError(f"the {what} {path} is not writable ({err.strerror or err}); "
                              "set results_dir to a writable folder") from None


def eval_device(num_gpus: int, gpu_ids: Sequence[int], task: str,
                cuda_count: Optional[int] = None) -> tuple[torch.device, List[str]]:
    """The one device evaluate/inference run on: the first of `gpu_ids`, or the CPU without GPU.

    `num_gpus` and `gpu_ids` are reconciled first (TAO's rule, `reconcile_gpus`); more than one
    GPU still runs one process, with a notice.

    Args:
        cuda_count: override for `torch.cuda.device_count()` (tests).

    Returns:
        (device, notices).
    """
    notices: List[str] = []
    num_gpus, ids = reconcile_gpus(num_gpus, gpu_ids, task, notices)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        notices.append(f"No GPU found: {task} runs on the CPU.")
        return torch.device("cpu"), notices
    index = ids[0]
    if index >= count:
        raise SpecError(f"{task}.gpu_ids {ids}: GPU {index} does not exist ({count} GPU(s))")
    if num_gpus > 1:
        notices.append(f"{task} runs in one process: using GPU {index} of {task}.gpu_ids {ids}.")
    return torch.device("cuda", index), notices


def activation_checkpoint_rule(spec, world_size: int):
    """TAO's rule: `train.activation_checkpoint` is switched off at run time when the model has
    fewer than four feature levels and more than one process trains it.

    Returns:
        `(spec, notice)`: the spec to train with (a copy with the flag off, or `spec` itself)
        and the one-line notice to print, or None.
    """
    import dataclasses

    t = spec.train
    if not (t.activation_checkpoint and spec.model.num_feature_levels < 4 and world_size > 1):
        return spec, None
    notice = (f"notice: train.activation_checkpoint is off for this run: the model has "
              f"{spec.model.num_feature_levels} feature levels (< 4) and {world_size} processes "
              "train it (TAO's rule)")
    return dataclasses.replace(spec, train=dataclasses.replace(t, activation_checkpoint=False)), notice
