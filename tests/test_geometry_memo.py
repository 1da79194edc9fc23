"""The geometry memo of eager CPU inference: the same outputs as computing afresh, used only
without padding, gradients, tracing or export."""
import pytest
import torch

import codetr.model.encoder as encoder_mod
import codetr.model.position_encoding as position_mod
import codetr.model.two_stage as two_stage_mod
from codetr.model.builder import build_model
from codetr.model.eval_fold import fold_for_eval
from codetr.model.geometry_memo import GeometryMemo, memo_applies, memo_disabled
from codetr.spec import spec_from_dict

MEMOS = (position_mod._ENCODINGS, encoder_mod._REFERENCES, two_stage_mod._PROPOSALS)


def _model():
    spec = spec_from_dict({"model": {"backbone": "resnet_18", "hidden_dim": 32, "nheads": 2,
                                     "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64,
                                     "num_queries": 12, "num_select": 12, "dn_number": 4,
                                     "num_feature_levels": 2, "return_interm_indices": [2, 3],
                                     "pretrained_backbone_path": None}})
    torch.manual_seed(0)
    model = build_model(spec, 5, load_pretrained_backbone=False).eval()
    fold_for_eval(model)
    return model


@pytest.fixture(autouse=True)
def _empty_memos():
    for memo in MEMOS:
        memo.clear()
    yield
    for memo in MEMOS:
        memo.clear()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_memoised_forwards_are_bit_identical_to_fresh_ones(mode):
    model = _model()
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    images = [torch.randn(2, 3, 96, 128) for _ in range(3)]
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    with context():
        with memo_disabled():
            fresh = [model(x, masks) for x in images]
        assert all(len(memo) == 0 for memo in MEMOS)
        # the first forward fills the memos, the next ones read them: a consumer that modified a
        # memoised tensor in place would make them differ
        memoised = [model(x, masks) for x in images]
        # one pixel encoding per level size, one set of reference points and proposals
        assert [len(memo) for memo in MEMOS] == [2, 1, 1]
    for a, b in zip(fresh, memoised):
        assert torch.equal(a["pred_logits"], b["pred_logits"])
        assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_memo_is_not_used_with_padding_gradients_or_tracing():
    model = _model()
    images = torch.randn(1, 3, 64, 96)
    padded = torch.zeros(1, 64, 96, dtype=torch.bool)
    padded[:, :, 48:] = True  # half the width: padding at every level
    with torch.no_grad():
        model(images, padded)
    assert all(len(memo) == 0 for memo in MEMOS)
    model(images, torch.zeros(1, 64, 96, dtype=torch.bool))  # grad enabled (eval mode)
    assert all(len(memo) == 0 for memo in MEMOS)
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    with torch.no_grad():
        assert memo_applies(mask) and not memo_applies(None)
        assert torch.jit.trace(lambda m: torch.tensor(float(memo_applies(m))), (mask,),
                               check_trace=False)(mask).item() == 0.0


def test_memo_keeps_the_most_recent_entries():
    memo = GeometryMemo(max_entries=2)
    calls = []

    def compute(k):
        calls.append(k)
        return k * 10

    assert [memo.get(k, lambda k=k: compute(k)) for k in (1, 2, 1, 3, 1, 2)] == [10, 20, 10, 30, 10, 20]
    assert calls == [1, 2, 3, 2] and len(memo) == 2  # 2 was the least recent when 3 came


def test_cached_builds_the_key_only_when_the_memo_applies():
    memo = GeometryMemo()
    keys = []
    padded = torch.zeros(1, 4, 4, dtype=torch.bool)
    padded[0, 0, 0] = True
    with torch.no_grad():
        assert memo.cached(padded, lambda: keys.append(1) or "k", lambda: 7) == 7
        assert keys == [] and len(memo) == 0
        assert memo.cached(torch.zeros(1, 4, 4, dtype=torch.bool), lambda: keys.append(1) or "k", lambda: 8) == 8
        assert keys == [1] and len(memo) == 1
