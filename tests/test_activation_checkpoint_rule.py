"""TAO's run-time rule: activation checkpointing is off for < 4 feature levels on > 1 process."""
import pytest

from codetr.spec import load_spec
from codetr.tasks.runtime import activation_checkpoint_rule


@pytest.mark.parametrize("levels, world, on", [(3, 2, False), (3, 1, True), (4, 2, True), (2, 8, False)])
def test_switched_off_only_for_few_levels_and_several_processes(levels, world, on):
    indices = list(range(4 - levels, 4))
    spec = load_spec(None, ["train.activation_checkpoint=true", f"model.num_feature_levels={levels}",
                            f"model.return_interm_indices={indices}"])
    used, notice = activation_checkpoint_rule(spec, world)
    assert used.train.activation_checkpoint is on and (notice is None) is on
    assert spec.train.activation_checkpoint  # the given spec is not changed
    if not on:
        assert f"{levels} feature levels (< 4) and {world} processes" in notice
    assert used.model == spec.model and used.train.optim == spec.train.optim


def test_nothing_to_switch_off():
    spec = load_spec(None, ["train.activation_checkpoint=false", "model.num_feature_levels=3",
                            "model.return_interm_indices=[1,2,3]"])
    assert activation_checkpoint_rule(spec, 4) == (spec, None)
