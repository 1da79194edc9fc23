"""The EMA is safe by default: a ramp scaled to the run forgets the initialisation, both weights
are validated, the saved choice is stated, a run that never learned says so."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from codetr.tasks.ema import ModelEMA, auto_warmup_steps
from codetr.tasks.train import report_end


def _trained_ema(total_steps: int, warmup_steps: int, decay: float = 0.999):
    """A weight that training moves from its init to `t` at step t; returns the EMA's value."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-100.0)  # the "random initialisation", far from every trained value
    ema = ModelEMA(model, decay, warmup_steps)
    for t in range(1, total_steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(t))
        ema.update(model)
    return float(ema.module.weight)


@pytest.mark.parametrize("steps", [40, 240, 2000, 12_000])
def test_auto_ramp_forgets_the_init_and_spans_about_a_tenth_of_the_run(steps):
    tau = auto_warmup_steps(steps)
    value = _trained_ema(steps, tau)
    lag = steps - value  # for weights growing by 1 per step, the lag is the average's span
    assert value > 0, "the average still remembers the initialisation"
    span = min(steps / 10, 1 / (1 - 0.999))
    assert 0.3 * span <= lag <= 2.5 * span, (tau, lag, span)


def test_without_a_ramp_a_short_run_is_mostly_its_initialisation():
    """The trap that gave AP 0.000: 240 steps at decay 0.999 keep 0.999^240 = 79% of the init."""
    value = _trained_ema(240, warmup_steps=0)
    d = 0.999
    exact = -100 * d ** 240 + sum((1 - d) * d ** (240 - t) * t for t in range(1, 241))
    assert value == pytest.approx(exact, abs=1e-2)  # float32 accumulation over 240 lerps
    assert value < 0  # still dominated by the initialisation (weight 0.999^240 = 0.79)


def test_auto_warmup_values():
    # (the 240-step value is covered by behaviour above: forgets the init, spans ~a tenth)
    assert auto_warmup_steps(1) == 1 and auto_warmup_steps(5) == 5


def _several_tensor_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                         nn.BatchNorm2d(5), nn.Flatten(), nn.LazyLinear(2))


@pytest.mark.parametrize("warmup_steps", [0, 7])
def test_every_floating_entry_follows_the_ema_rule_and_integer_buffers_are_copied(warmup_steps):
    """ModelEMA's documented rule on a model of several parameter tensors and BatchNorm buffers:
    after each update, EVERY floating state_dict entry is `d * ema + (1 - d) * weights` with
    `d = decay * (1 - exp(-updates / warmup_steps))` (or `decay` without a ramp), and the integer
    `num_batches_tracked` is the model's (copied)."""
    model = _several_tensor_net()
    model.eval()(torch.randn(2, 3, 6, 6))  # materialise the LazyLinear (no statistics update)
    decay = 0.9
    ema = ModelEMA(model, decay, warmup_steps)
    floating = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]
    integer = [k for k, v in model.state_dict().items() if not v.dtype.is_floating_point]
    assert len(floating) == 14 and integer == ["1.num_batches_tracked", "4.num_batches_tracked"]
    for step in range(1, 4):
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        model.train()  # a train-mode forward moves the running statistics and the counts ...
        with torch.no_grad():
            model(torch.randn(4, 3, 6, 6) * 3 + 1)
            for p in model.parameters():  # ... and "training" moves every weight
                p.add_(torch.randn_like(p))
        now = {k: v.clone() for k, v in model.state_dict().items()}
        ema.update(model)
        d = decay * (1 - math.exp(-step / warmup_steps)) if warmup_steps else decay
        after = ema.module.state_dict()
        for k in floating:
            assert not torch.equal(now[k], before[k]), k  # the step moved it: the check can fail
            expected = d * before[k].double() + (1 - d) * now[k].double()
            error = (after[k].double() - expected).abs()
            # The float32 lerp against the formula in float64, relative to the larger of the two
            # inputs (the running variances reach ~700; an expected value near 0 makes a
            # relative-to-expected bound meaningless): measured <= 1.0e-7 (one float32 ulp) over
            # 300 seeds; 1e-6 gives 10x margin. A skipped entry stays put, off by
            # (1 - d) * |now - before|.
            scale = torch.maximum(before[k].abs(), now[k].abs()).double()
            assert (error <= 1e-6 * scale + 1e-12).all(), (k, (error / scale).max())
        for k in integer:
            assert int(after[k]) == int(now[k]) == step, k
    assert ema.updates == 3


def _module(ema: bool, val: dict, mode: str = "best", best: float = 0.0, validations: int = 1):
    module = SimpleNamespace(ema=object() if ema else None, val_metrics=val, ema_final_weights=mode,
                             best_val_ap=best, validations=validations)
    from codetr.tasks.module import CoDETRModule
    module.final_weights = lambda: CoDETRModule.final_weights(module)
    return module


def test_best_weights_are_chosen_by_validation_and_stated(capsys):
    module = _module(True, {"ema": {"AP": 0.20}, "raw": {"AP": 0.31}}, best=0.31)
    report_end(module, "x/codetr_model.pth")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == ("x/codetr_model.pth hands the raw weights to evaluate/inference (the better "
                       "AP on the last validation (train.ema.final_weights: best))")
    module = _module(True, {"ema": {"AP": 0.31}, "raw": {"AP": 0.31}}, best=0.31)
    assert module.final_weights() == "ema"  # a tie keeps the average
    assert _module(True, {"ema": {"AP": 0.1}, "raw": {"AP": 0.5}}, mode="ema").final_weights() == "ema"
    assert _module(False, {"raw": {"AP": 0.5}}).final_weights() == "raw"


def test_a_run_that_never_learned_says_so_in_its_last_line(capsys):
    report_end(_module(True, {"ema": {"AP": 0.0}, "raw": {"AP": 0.0}}, validations=6), "m.pth")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("warning: validation AP stayed 0.000 in all 6 validations")
    report_end(_module(True, {"ema": {"AP": 0.0}, "raw": {"AP": 0.01}}, best=0.01), "m.pth")
    assert "warning" not in capsys.readouterr().out
