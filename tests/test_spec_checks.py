"""Spec combinations that used to pass validation and crash later, error wording for union-typed
keys, errors blamed on the override that caused them, and TAO's num_gpus / gpu_ids rule."""
from __future__ import annotations

import random

import pytest

from codetr.cli import main
from codetr.model.backbone import Backbone
from codetr.spec import SpecError, load_spec
from codetr.spec.load import TAO_INTERM_INDICES
from codetr.tasks.runtime import eval_device, reconcile_gpus


def _levels(idx) -> list[str]:
    return [f"model.return_interm_indices={list(idx)}".replace(" ", ""),
            f"model.num_feature_levels={len(idx)}"]


def test_consecutive_interm_indices_pass_and_build():
    start = random.randint(0, 3)
    idx = list(range(start, random.randint(start + 1, 5)))
    assert load_spec(None, _levels(idx)).model.return_interm_indices == idx
    # what check_spec lets through, the backbone builds (on the meta device: no memory)
    import torch
    with torch.device("meta"):
        assert Backbone("resnet_18", idx, channels_last=False).num_extra_levels == int(4 in idx)


@pytest.mark.parametrize("idx", [[1, 3], [0, 2, 3], [2, 1], [1, 2, 4], [0, 1, 3, 4]])
def test_gaps_or_disorder_in_interm_indices_are_spec_errors(idx):
    with pytest.raises(SpecError) as err:
        load_spec(None, _levels(idx))
    text = str(err.value)
    assert "model.return_interm_indices" in text and "consecutive" in text
    assert all(str(allowed) in text for allowed in TAO_INTERM_INDICES)


def test_slot_4_alone_is_a_spec_error():
    with pytest.raises(SpecError, match=r"return_interm_indices=\[4\].*needs slot 3"):
        load_spec(None, _levels([4]) + [f"model.backbone={random.choice(['resnet_50', 'vit_large_dinov2'])}"])


def test_all_matching_costs_zero_is_a_spec_error():
    keys = ["model.cls_loss_coef", "model.bbox_loss_coef", "model.giou_loss_coef"]
    with pytest.raises(SpecError) as err:
        load_spec(None, [f"{k}=0" for k in keys])
    assert all(k in str(err.value) for k in keys)
    one = random.choice(keys)  # any one cost > 0 is a valid matcher
    spec = load_spec(None, [f"{k}=0" for k in keys if k != one] + [f"{one}={random.uniform(0.1, 5):.3f}"])
    assert getattr(spec.model, one.split(".")[1]) > 0


@pytest.mark.parametrize("task", ["export", "gen_trt_engine"])
def test_batch_size_is_dynamic_or_positive(task):
    with pytest.raises(SpecError, match=rf"{task}\.batch_size=0 is not supported.*-1 \(dynamic"):
        load_spec(None, [f"{task}.batch_size=0"])
    below = -random.randint(2, 9)
    with pytest.raises(SpecError, match=rf"{task}\.batch_size={below} is out of range: must be >= -1"):
        load_spec(None, [f"{task}.batch_size={below}"])
    fixed = random.randint(1, 16)
    assert getattr(load_spec(None, [f"{task}.batch_size={fixed}"]), task).batch_size == fixed


def test_union_keys_spell_out_their_members(capsys):
    value = random.randint(1, 99)
    assert main(["spec", f"dataset.infer_data_sources.image_dir={value}"]) == 2
    err = capsys.readouterr().err
    assert f"dataset.infer_data_sources.image_dir: expected a string or a list of strings, got int {value}" in err
    assert "Union" not in err
    # a list with a bad item names the item
    assert main(["spec", f"dataset.infer_data_sources.image_dir=[a,{value}]"]) == 2
    assert f"image_dir[1]: expected a string, got int {value}" in capsys.readouterr().err
    with pytest.raises(SpecError, match="model.return_interm_indices: expected a list of integers"):
        load_spec(None, ["model.return_interm_indices=3"])


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    in_file = random.randint(1, 2000)
    bad = random.randint(2001, 9999)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model:\n  num_queries: {in_file}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["train.seed=3", f"model.num_queries={bad}"])
    assert str(err.value).startswith(f"override model.num_queries={bad}: model.num_queries={bad} is out of range")
    # the file's own error is still the file's, whatever the overrides
    spec.write_text(f"model:\n  num_queries: {bad}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["train.seed=3"])
    assert str(err.value).startswith(f"{spec}: model.num_queries={bad}")


def test_a_cross_field_error_names_every_override_involved(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  num_feature_levels: 3\n  return_interm_indices: [1, 2, 3]\n")
    levels = random.choice([1, 4, 5])
    with pytest.raises(SpecError) as err:
        load_spec(spec, ["model.return_interm_indices=[1,2]", f"model.num_feature_levels={levels}"])
    assert str(err.value).startswith("overrides model.return_interm_indices=[1,2] "
                                     f"model.num_feature_levels={levels}: ")
    with pytest.raises(SpecError) as err:  # the message names one key: that override is the cause
        load_spec(spec, ["model.return_interm_indices=[1,3]", "model.num_feature_levels=2"])
    assert str(err.value).startswith("override model.return_interm_indices=[1,3]: ")
    with pytest.raises(SpecError) as err:  # the file's 3 levels against an override's 2 indices
        load_spec(spec, ["model.return_interm_indices=[2,3]"])
    assert str(err.value).startswith("override model.return_interm_indices=[2,3]: ")
    with pytest.raises(SpecError, match=r"^override ~train\.sede: unknown key 'train\.sede'"):
        load_spec(spec, ["~train.sede"])


def test_gpu_settings_follow_the_larger():
    """TAO (seed 001): num_gpus = 1, gpu_ids = [0, 1] -> num_gpus = 2; a larger num_gpus extends
    gpu_ids with unused indices, keeping the listed ones first."""
    for _ in range(20):
        ids = random.sample(range(8), random.randint(1, 4))
        num_gpus = random.randint(1, 6)
        notices: list[str] = []
        n, new_ids = reconcile_gpus(num_gpus, ids, "train", notices)
        assert n == len(new_ids) == max(num_gpus, len(ids))
        assert new_ids[:len(ids)] == ids and len(set(new_ids)) == n
        if num_gpus == len(ids) or ids == [0]:
            assert not notices
        else:
            assert notices == [f"notice: train.num_gpus={num_gpus} and train.gpu_ids={ids} disagree: "
                               f"following the setting with more GPUs (TAO's rule), train.num_gpus="
                               f"{n}, train.gpu_ids={new_ids}"]


@pytest.mark.parametrize("task", ["evaluate", "inference"])
def test_eval_device_reconciles_and_names_the_task_keys(task):
    first = random.randint(0, 2)
    device, notices = eval_device(1, [first, 3], task, cuda_count=4)
    assert device.type == "cuda" and device.index == first
    assert any(f"{task}.num_gpus=1 and {task}.gpu_ids=[{first}, 3]" in n for n in notices), notices
    assert any(f"{task} runs in one process" in n for n in notices), notices
    with pytest.raises(SpecError, match=rf"{task}\.gpu_ids \[5\]"):
        eval_device(1, [5], task, cuda_count=2)
