"""Parts of `bench/gpu_check.py`: sizes, the training step, the DDP row and the deploy rows.

Every row is a dict with the columns of `gpu_check.COLUMNS`; a check that cannot run here is a
row with status `skipped` and the reason in `note`, never an absent row.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

# TAO's default Co-DINO head on a ResNet-50 (tests/export_fixtures.py `tao_sized_model_dict`).
TAO_MODEL = {"backbone": "resnet_50", "num_feature_levels": 4, "return_interm_indices": [1, 2, 3, 4],
             "hidden_dim": 256, "nheads": 8, "enc_layers": 6, "dec_layers": 6, "num_queries": 900,
             "dim_feedforward": 2048, "dec_n_points": 4, "enc_n_points": 4, "num_select": 300,
             "num_co_heads": 1}
TINY_MODEL = {"backbone": "resnet_18", "num_feature_levels": 4, "return_interm_indices": [1, 2, 3, 4],
              "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "num_queries": 20,
              "dim_feedforward": 64, "dec_n_points": 2, "enc_n_points": 2, "num_select": 20,
              "dn_number": 6, "num_co_heads": 1, "co_head_num_convs": 1,
              # CPU fp16 convolution backward has no fast kernel: a frozen trunk keeps the dry
              # run short (the head, neck and co-head convolutions still run backward).
              "train_backbone": False}
NUM_CLASSES = 80
DEPLOY_TOL = 1e-3  # sigmoid scores and normalised boxes, as `codetr export` verifies


def sizes(dry: bool) -> dict:
    """The check's sizes: the issue's (1024^2 MSDA, TAO model at batch 2 x 800^2) or tiny ones."""
    if dry:
        return {"msda_image": 64, "msda_heads": 1, "msda_dim": 8, "msda_points": 1,
                "msda_queries": 16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2 + 1, "model": TINY_MODEL,
                "model_name": "tiny R18 4 lvl 32d 1+2", "batch": 2, "image": 64,
                "gts": 3, "export_image": 96}
    return {"msda_image": 1024, "msda_heads": 8, "msda_dim": 32, "msda_points": 4,
            "msda_queries": sum((1024 // s) ** 2 for s in (4, 8, 16, 32, 64)), "model": TAO_MODEL,
            "model_name": "TAO R50 4 lvl 256d 6+6 900q", "batch": 2, "image": 800,
            "gts": 20, "export_image": 640}


def skip_row(check: str, config: str, dtype: str, reason: str) -> dict:
    return {"check": check, "config": config, "dtype": dtype, "ms": None, "max_err": None,
            "peak_MiB": None, "status": "skipped", "note": reason}


def _spec(size: dict):
    from codetr.spec import spec_from_dict

    return spec_from_dict({"model": {**size["model"], "pretrained_backbone_path": None},
                           "dataset": {"num_classes": NUM_CLASSES},
                           "train": {"activation_checkpoint": False}})


def random_targets(size: dict, device: torch.device, generator: torch.Generator) -> list[dict]:
    """`batch` targets (cxcywh normalised boxes, labels, size) of `gts` random boxes each."""
    targets = []
    for i in range(size["batch"]):
        n = size["gts"]
        cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        hw = torch.tensor([size["image"], size["image"]])
        targets.append({"boxes": torch.cat([cxcy, wh], 1).to(device),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(device),
                        "size": hw.to(device), "orig_size": hw.to(device), "image_id": i + 1})
    return targets


def step_setup(size: dict, device: torch.device, autocast: Optional[torch.dtype],
               ddp: bool = False) -> tuple[Callable[[], dict], Callable[[], None]]:
    """`(step, release)`: `step()` runs one training step and returns `{term: float}`."""
    from codetr.model.builder import build_criterion, build_model

    torch.manual_seed(0)
    spec = _spec(size)
    model = build_model(spec, NUM_CLASSES, load_pretrained_backbone=False).to(device).train()
    criterion = build_criterion(spec, NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    net: torch.nn.Module = model
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        # The co-heads and denoising use every parameter in a step, but a batch without
        # positives would leave some unused: let DDP look.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                        find_unused_parameters=True)
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(size["batch"], 3, size["image"], size["image"], generator=gen).to(device)
    masks = torch.zeros(size["batch"], size["image"], size["image"], dtype=torch.bool, device=device)
    targets = random_targets(size, device, gen)

    def step() -> dict:
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            losses = criterion(net(images, masks, targets), targets)
            loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()  # one sync
        return dict(zip(losses, values))

    def release() -> None:
        nonlocal net, optimizer
        del net, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return step, release


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, size: dict, dry: bool, iters: int, port: int, out: str) -> None:
    import torch.distributed as dist

    device = torch.device("cpu") if dry else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group("gloo" if dry else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2)
    try:
        step, _ = step_setup(size, device, None, ddp=True)
        losses = step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if rank == 0:
            Path(out).write_text(json.dumps({"ms": statistics.median(times), "peak": peak,
                                             "finite": all(map(math.isfinite, losses.values())),
                                             "terms": len(losses)}))
    finally:
        dist.destroy_process_group()


def ddp_row(size: dict, dry: bool, iters: int) -> dict:
    """2-process DDP training step (NCCL on 2 GPUs; gloo on the CPU with `--dry`)."""
    config = f"{size['model_name']}, 2 x batch {size['batch']} @ {size['image']}^2"
    if not dry and torch.cuda.device_count() < 2:
        return skip_row("ddp_step", config, "fp32",
                        f"{torch.cuda.device_count()} GPU visible, DDP needs 2")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        try:
            mp.spawn(_ddp_worker, args=(size, dry, iters, _free_port(), out), nprocs=2)
            res = json.loads(Path(out).read_text())
        except Exception as error:
            traceback.print_exc()
            return {**skip_row("ddp_step", config, "fp32", f"{type(error).__name__}: {error}"),
                    "status": "FAIL"}
    backend = "gloo, CPU" if dry else "NCCL"
    return {"check": "ddp_step", "config": config, "dtype": "fp32", "ms": res["ms"],
            "max_err": None, "peak_MiB": res["peak"], "status": "ok" if res["finite"] else "FAIL",
            "note": f"{backend}; rank 0; {res['terms']} loss terms "
                    f"{'all finite' if res['finite'] else 'NOT finite'}"}


def _deploy_ok(parity) -> bool:
    """Scores and boxes within DEPLOY_TOL and the top-k the same up to ties."""
    return (parity.max_score_diff <= DEPLOY_TOL and parity.max_box_diff <= DEPLOY_TOL
            and parity.topk_same_up_to_ties)


def _median_ms(fn, iters: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def deploy_rows(size: dict, device: torch.device, iters: int) -> list[dict]:
    """onnxruntime vs eager, and TensorRT vs onnxruntime, on the exported model (batch 1)."""
    from codetr.data.labels import LabelMap
    from codetr.export.graph import DetectorGraph
    from codetr.export.onnx_export import export_onnx
    from codetr.export.onnx_runtime import make_session
    from codetr.export.parity import compare_outputs
    from codetr.model.builder import build_model
    from codetr.spec import spec_to_dict

    hw = size["export_image"]
    config = f"{size['model_name']}, batch 1 @ {hw}^2"
    spec = _spec(size)
    torch.manual_seed(0)
    model = build_model(spec, NUM_CLASSES, load_pretrained_backbone=False).eval()
    labels = LabelMap(tuple(range(NUM_CLASSES)), tuple(f"c{i}" for i in range(NUM_CLASSES)), True,
                      NUM_CLASSES)
    images = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            # onnxslim may be missing on a lent GPU machine: export unsimplified then (noted).
            slim = importlib.util.find_spec("onnxslim") is not None
            export_onnx(model, path, label_map=labels, spec_data=spec_to_dict(spec), weights="raw",
                        height=hw, width=hw, batch_size=1, simplify=slim)
            with torch.no_grad():
                eager = DetectorGraph(model)(images)
            session = make_session(path, device)
            feed = {"images": images.numpy()}
            ort_out = [torch.from_numpy(a) for a in session.run(None, feed)]
            parity = compare_outputs(*eager, *ort_out, tolerance=DEPLOY_TOL)
            ms = _median_ms(lambda: session.run(None, feed), iters, torch.device("cpu"))
            rows.append({"check": "onnxruntime", "config": config, "dtype": "fp32", "ms": ms,
                         "max_err": parity.max_score_diff, "peak_MiB": None,
                         "status": "ok" if _deploy_ok(parity) else "FAIL",
                         "note": f"{session.get_providers()[0]}{'' if slim else ', no onnxslim'}; vs eager: box diff "
                                 f"{parity.max_box_diff:.1e}, top-{parity.topk} same "
                                 f"{parity.topk_same_up_to_ties}"})
        except Exception as error:
            traceback.print_exc()
            rows.append({**skip_row("onnxruntime", config, "fp32", f"export/ORT: {error}"),
                         "status": "FAIL"})
            return rows + [skip_row("tensorrt", config, "fp32", "no ONNX file (export failed)")]
        rows.append(_tensorrt_row(path, config, images, ort_out, device, iters))
    return rows


def _tensorrt_row(path: str, config: str, images: torch.Tensor, ort_out: list, device: torch.device,
                  iters: int) -> dict:
    """TensorRT fp32 engine of the file: latency and parity against onnxruntime."""
    from codetr.export.parity import compare_outputs

    if device.type != "cuda":
        return skip_row("tensorrt", config, "fp32", "no CUDA device")
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return skip_row("tensorrt", config, "fp32", f"tensorrt does not import: {error}")
    from codetr.export.tensorrt_engine import EngineProfile, TrtRunner, build_engine

    try:
        start = time.perf_counter()
        runner = TrtRunner(build_engine(path, EngineProfile(1, 1, 1), "fp32", workspace_mib=4096),
                           device)
        build_s = time.perf_counter() - start
        feeds = {"images": images.to(device)}
        out = runner(feeds)
        parity = compare_outputs(*ort_out, out["pred_logits"].cpu(), out["pred_boxes"].cpu(),
                                 tolerance=DEPLOY_TOL)
        ms = _median_ms(lambda: runner(feeds), iters, device)
        return {"check": "tensorrt", "config": config, "dtype": "fp32", "ms": ms,
                "max_err": parity.max_score_diff, "peak_MiB": None,
                "status": "ok" if _deploy_ok(parity) else "FAIL",
                "note": f"vs onnxruntime: box diff {parity.max_box_diff:.1e}, top-{parity.topk} "
                        f"same {parity.topk_same_up_to_ties}; build {build_s:.0f} s"}
    except Exception as error:
        traceback.print_exc()
        return {**skip_row("tensorrt", config, "fp32", f"{type(error).__name__}: {error}"),
                "status": "FAIL"}
