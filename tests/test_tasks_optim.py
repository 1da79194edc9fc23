"""Parameter groups, freezing, the LR schedule and runtime resolution."""
import pytest
import torch
from torch import nn

from codetr.spec.schema import OptimConfig
from codetr.tasks.optim import (build_optimizer, build_param_groups, build_scheduler,
                                freeze_parameters, lr_factor, vit_layer_scale)
from codetr.tasks.runtime import resolve_runtime


class Named(nn.Module):
    """Parameter names like a Co-DETR with a 3-block ViT backbone."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Module()  # the pretrained trunk
        self.backbone.body.patch_embed = nn.Linear(3, 4)
        self.backbone.body.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.backbone.body.norm = nn.LayerNorm(4)
        self.backbone.pyramid = nn.Linear(4, 4)  # new layers: the base lr
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.sampling_offsets = nn.Linear(4, 8)
        self.transformer.encoder.value_proj = nn.Linear(4, 4)
        self.transformer.decoder = nn.Linear(4, 4)
        self.class_embed = nn.Linear(4, 2)


def groups_by_param(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_param_groups_learning_rates():
    model = Named()
    cfg = OptimConfig(lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1, layer_decay_rate=0.5)
    by = groups_by_param(build_param_groups(model, cfg))
    assert by[id(model.class_embed.weight)]["lr"] == pytest.approx(1e-3)
    assert by[id(model.transformer.encoder.sampling_offsets.weight)]["lr"] == pytest.approx(1e-4)
    assert by[id(model.backbone.body.blocks[0].weight)]["lr"] == pytest.approx(1e-4)  # no decay: not ViT
    assert by[id(model.backbone.pyramid.weight)]["lr"] == pytest.approx(1e-3)
    by = groups_by_param(build_param_groups(model, cfg, vit_layer_decay=True))
    # depth 3: patch_embed layer 0 -> 0.5^4, blocks.i -> 0.5^(3 - i), norm -> 1.
    assert by[id(model.backbone.body.patch_embed.weight)]["lr"] == pytest.approx(1e-4 * 0.5 ** 4)
    assert [by[id(b.weight)]["lr"] for b in model.backbone.body.blocks] == pytest.approx(
        [1e-4 * 0.5 ** 3, 1e-4 * 0.5 ** 2, 1e-4 * 0.5])
    assert by[id(model.backbone.body.norm.weight)]["lr"] == pytest.approx(1e-4)
    assert vit_layer_scale("backbone.blocks.11.attn.qkv.weight", 12, 0.65) == pytest.approx(0.65)


def test_freeze_prefixes():
    model = Named()
    counts = freeze_parameters(model, ["backbone", "transformer.encoder"])
    assert counts == {"backbone": 2 + 6 + 2 + 2, "transformer.encoder": 4}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("backbone.", "transformer.encoder.")) for n in frozen)
    assert model.transformer.decoder.weight.requires_grad
    groups = build_param_groups(model, OptimConfig())
    assert {g["name"] for g in groups} == {"base"}
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_parameters(model, ["transformer.enc"])  # a name prefix, not a module prefix


def test_optimizers():
    model = Named()
    groups = build_param_groups(model, OptimConfig())
    sgd = build_optimizer(groups, OptimConfig(optimizer="SGD", momentum=0.8, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    adamw = build_optimizer(build_param_groups(model, OptimConfig()), OptimConfig(weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    assert adamw.defaults["fused"]
    unfused = build_optimizer(build_param_groups(model, OptimConfig()), OptimConfig(),
                              allow_fused=False)
    assert not unfused.defaults["fused"]


def test_fused_adamw_matches_the_foreach_update():
    torch.manual_seed(0)
    fused_model, ref_model = Named(), Named()
    ref_model.load_state_dict(fused_model.state_dict())
    start = [p.detach().clone() for p in fused_model.parameters()]
    cfg = OptimConfig(lr=1e-2, lr_backbone=3e-3, weight_decay=0.05)
    fused = build_optimizer(build_param_groups(fused_model, cfg), cfg)
    groups = build_param_groups(ref_model, cfg)
    ref = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in fused_model.parameters()]
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(fused_model.parameters(), start))


def test_schedule_multistep_steplr_warmup():
    f = dict(steps_per_epoch=10, lr_step_size=2, lr_decay=0.1)
    assert lr_factor(0, scheduler="MultiStep", lr_steps=[2, 3], warmup_steps=0, **f) == 1.0
    assert lr_factor(19, scheduler="MultiStep", lr_steps=[2, 3], warmup_steps=0, **f) == 1.0
    assert lr_factor(20, scheduler="MultiStep", lr_steps=[2, 3], warmup_steps=0, **f) == pytest.approx(0.1)
    assert lr_factor(35, scheduler="MultiStep", lr_steps=[2, 3], warmup_steps=0, **f) == pytest.approx(0.01)
    assert lr_factor(45, scheduler="StepLR", lr_steps=[], warmup_steps=0, **f) == pytest.approx(0.01)
    assert lr_factor(4, scheduler="StepLR", lr_steps=[], warmup_steps=10, **f) == pytest.approx(0.5)
    # Through the real LambdaLR: the first step runs at lr / warmup_steps.
    model = Named()
    cfg = OptimConfig(lr=1.0, lr_backbone=0.5, warmup_steps=4, lr_steps=[1])
    opt = build_optimizer(build_param_groups(model, cfg), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    base = next(g for g in opt.param_groups if g["name"] == "base")
    lrs = []
    for _ in range(7):
        lrs.append(base["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.1, 0.1])
    assert set(sched.state_dict()) >= {"last_epoch", "base_lrs"}


def test_runtime_cpu_and_gpu_resolution():
    rt = resolve_runtime(4, [0], 2, "bf16", "ddp", cuda_count=0)
    assert rt.accelerator == "cpu" and rt.devices == 4 and rt.world_size == 8
    assert rt.precision == "bf16-mixed" and type(rt.strategy).__name__ == "DDPStrategy"
    assert rt.num_nodes == 2 and any("No GPU" in n for n in rt.notices)
    rt = resolve_runtime(1, [0], 1, "fp16", "ddp", cuda_count=0)
    assert rt.strategy == "auto" and rt.precision == "bf16-mixed" and len(rt.notices) == 2
    assert resolve_runtime(2, [0], 1, "fp32", "fsdp", cuda_count=0).world_size == 2
    rt = resolve_runtime(2, [0], 1, "fp16", "fsdp", cuda_count=4)
    assert rt.devices == [0, 1] and rt.precision == "16-mixed" and type(rt.strategy).__name__ == "FSDPStrategy"
    assert resolve_runtime(2, [2, 3], 1, "fp32", "ddp", cuda_count=4).devices == [2, 3]
    with pytest.raises(ValueError, match=r"train\.gpu_ids \[5\] do not exist"):
        resolve_runtime(1, [5], 1, "fp32", "ddp", cuda_count=2)


def test_runtime_follows_the_setting_with_more_gpus():
    """TAO (seed 001): inconsistent num_gpus / gpu_ids follow the larger, with a notice that
    names the full keys; more ids than num_gpus raise num_gpus, more num_gpus extend the ids."""
    rt = resolve_runtime(1, [2, 0], 1, "fp32", "ddp", cuda_count=4)
    assert rt.devices == [2, 0] and rt.world_size == 2
    assert any("train.num_gpus=1 and train.gpu_ids=[2, 0]" in n and "train.num_gpus=2" in n
               for n in rt.notices), rt.notices
    rt = resolve_runtime(3, [1, 3], 1, "fp32", "ddp", cuda_count=4, task="train")
    assert rt.devices == [1, 3, 0] and rt.world_size == 3
    assert any("train.gpu_ids=[1, 3, 0]" in n for n in rt.notices), rt.notices
    # no GPU: the reconciled count is the number of CPU processes
    assert resolve_runtime(1, [0, 1, 2], 1, "fp32", "ddp", cuda_count=0).devices == 3
    # TAO's default ids with num_gpus > 1 is the usual way to ask for N GPUs: no notice
    assert not [n for n in resolve_runtime(2, [0], 1, "fp32", "ddp", cuda_count=2).notices
                if "disagree" in n]


def test_freeze_takes_tao_module_names():
    """Seed 000's example `["backbone", "transformer.encoder"]` and seed 001's `input_proj` name
    modules of TAO's DINO; in the Co-DINO model they sit under `query_head.` and `neck`."""
    from codetr.model.builder import build_model
    from codetr.spec import spec_from_dict
    from tests.zoo_fixtures import TINY_SPEC

    model = build_model(spec_from_dict(TINY_SPEC), 3, load_pretrained_backbone=False)
    names = {n for n, _ in model.named_parameters()}
    counts = freeze_parameters(model, ["transformer.encoder", "input_proj"])
    encoder = {n for n in names if n.startswith("query_head.transformer.encoder.")}
    neck = {n for n in names if n.startswith("neck.")}
    assert encoder and neck and counts == {"transformer.encoder": len(encoder), "input_proj": len(neck)}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == encoder | neck
    with pytest.raises(ValueError, match="'transformer.encode' matches no parameter"):
        freeze_parameters(model, ["transformer.encode"])  # a typo stays an error
