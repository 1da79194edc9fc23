"""QueryHead: output contract, two-stage modes, self-attention types, gradients, state-dict names."""
import math

import pytest
import torch

from codetr.boxes import REFINE_EPS
from codetr.model.query_head import QueryHead

HIDDEN, CLASSES, QUERIES, B = 32, 5, 10, 2


def _head(**overrides) -> QueryHead:
    args = dict(
        num_classes=CLASSES, hidden_dim=HIDDEN, nheads=2, num_feature_levels=2, enc_layers=1, dec_layers=2,
        dim_feedforward=64, dropout=0.0, enc_n_points=2, dec_n_points=2, num_queries=QUERIES,
        two_stage_type="standard", embed_init_tgt=True, decoder_sa_type="sa", fix_refpoints_hw=-1,
        pre_norm=False, use_dn=True, dn_number=6, dn_box_noise_scale=1.0, dn_label_noise_ratio=0.5,
        num_co_heads=2, activation_checkpoint=False,
    )
    args.update(overrides)
    return QueryHead(**args)


def _inputs(levels: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats, masks, pos = [], [], []
    for lvl in range(levels):
        size = max(8 >> lvl, 1)
        feats.append(torch.randn(B, HIDDEN, size, size, generator=gen))
        mask = torch.zeros(B, size, size, dtype=torch.bool)
        mask[1, :, size - size // 4:] = True  # image 1 is padded on the right
        masks.append(mask)
        pos.append(torch.randn(B, HIDDEN, size, size, generator=gen))
    targets = [
        {"labels": torch.randint(0, CLASSES, (n,), generator=gen),
         "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.5 + 0.25,
                             torch.rand(n, 2, generator=gen) * 0.3 + 0.1], 1)}
        for n in (3, 1)
    ]
    return feats, masks, pos, targets


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_training_outputs_for_each_level_count(levels):
    torch.manual_seed(levels)
    head = _head(num_feature_levels=levels).train()
    feats, masks, pos, targets = _inputs(levels)
    out = head(feats, masks, pos, targets)
    assert out["pred_logits"].shape == (B, QUERIES, CLASSES) and out["pred_boxes"].shape == (B, QUERIES, 4)
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (B, QUERIES, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (B, QUERIES, CLASSES)
    dn = out["dn_outputs"]
    assert dn["dn_meta"] == {"num_groups": 2, "max_gt": 3, "pad_size": 12}
    assert dn["pred_logits"].shape == (B, 12, CLASSES) and len(dn["aux_outputs"]) == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    mem = out["memory"]
    assert mem.memory.shape == (B, sum(max(8 >> i, 1) ** 2 for i in range(levels)), HIDDEN)
    assert mem.valid_ratios.shape == (B, levels, 2) and mem.spatial_shapes.shape == (levels, 2)
    maps = head.aux_feature_maps(mem)
    assert len(maps) == levels + 1
    for lvl, m in enumerate(maps[:-1]):
        assert m.shape == feats[lvl].shape
    last = feats[-1].shape[-1]
    assert maps[-1].shape == (B, HIDDEN, (last + 1) // 2, (last + 1) // 2)


def test_eval_has_no_auxiliary_outputs_and_matches_training_predictions():
    torch.manual_seed(0)
    head = _head()
    feats, masks, pos, targets = _inputs()
    head.eval()
    with torch.no_grad():
        out = head(feats, masks, pos, targets)
    assert set(out) == {"pred_logits", "pred_boxes", "memory"}
    head.train()
    with torch.no_grad():
        train_out = head(feats, masks, pos, None)  # training mode without targets: no dn either
    assert set(train_out) == {"pred_logits", "pred_boxes", "memory"}
    torch.testing.assert_close(train_out["pred_boxes"], out["pred_boxes"])


def test_denoising_does_not_change_matching_predictions():
    """The attention mask hides the dn queries from the matching ones."""
    torch.manual_seed(1)
    head = _head().train()
    feats, masks, pos, targets = _inputs()
    with torch.no_grad():
        with_dn = head(feats, masks, pos, targets)
        head.use_dn = False
        without = head(feats, masks, pos, targets)
    assert "dn_outputs" in with_dn and "dn_outputs" not in without
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_batch_without_ground_truth_has_no_dn_queries():
    head = _head().train()
    feats, masks, pos, _ = _inputs()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * B
    out = head(feats, masks, pos, empty)
    assert "dn_outputs" not in out and "aux_outputs" in out


@pytest.mark.parametrize("sa_type", ["sa", "ca_label", "ca_content"])
def test_each_decoder_self_attention_type_runs_and_trains(sa_type):
    torch.manual_seed(2)
    head = _head(decoder_sa_type=sa_type).train()
    feats, masks, pos, targets = _inputs()
    out = head(feats, masks, pos, targets)
    loss = out["pred_logits"].sigmoid().sum() + out["dn_outputs"]["pred_boxes"].sum()
    loss.backward()
    first = head.transformer.decoder.layers[0].attentions[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    if sa_type == "ca_label":
        assert head.transformer.decoder.sa_label_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fix_hw", [-1, -2, 0.25, 1])
def test_two_stage_no_uses_learned_references(fix_hw):
    torch.manual_seed(3)
    head = _head(two_stage_type="no", fix_refpoints_hw=fix_hw).train()
    assert len(head.cls_branches) == 2 and head.transformer.enc_output is None
    feats, masks, pos, targets = _inputs()
    out = head(feats, masks, pos, targets)
    assert "interm_outputs" not in out and out["pred_boxes"].shape == (B, QUERIES, 4)
    # Zero-initialised box deltas: the first layer predicts exactly its reference boxes, up to
    # the refinement logit's clamp to [REFINE_EPS, 1 - REFINE_EPS] (mmdet's 1e-3).
    refs = head.transformer._learned_references().sigmoid().clamp(REFINE_EPS, 1 - REFINE_EPS)
    assert out["dn_outputs"]["aux_outputs"][0]["pred_boxes"].shape == (B, 12, 4)
    first = out["aux_outputs"][0]["pred_boxes"]
    torch.testing.assert_close(first, refs[None].expand(B, -1, -1), atol=1e-5, rtol=1e-5)
    if fix_hw > 0:
        expected = torch.full_like(first[..., 2:], min(fix_hw, 1 - REFINE_EPS))
        torch.testing.assert_close(first[..., 2:], expected, atol=1e-5, rtol=0)
    if fix_hw == -2:
        assert head.transformer.hw_embed.weight.shape == (1, 2)
        assert torch.allclose(first[..., 2:], first[:1, :1, 2:])


def test_branch_initialisation_and_standard_references():
    torch.manual_seed(4)
    head = _head()
    for branch in head.cls_branches:
        torch.testing.assert_close(branch.bias, torch.full((CLASSES,), -math.log(99.0)))
    for branch in head.reg_branches:
        assert not branch[-1].weight.any() and not branch[-1].bias.any()
    assert len(head.cls_branches) == 3  # 2 decoder layers + the encoder proposals
    feats, masks, pos, targets = _inputs()
    out = head.train()(feats, masks, pos, targets)
    # Layer 0 starts on the (detached) top-k proposals = the intermediate boxes.
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], out["interm_outputs"]["pred_boxes"],
                               atol=1e-5, rtol=1e-5)


def test_embed_init_tgt_false_and_pre_norm_run():
    head = _head(embed_init_tgt=False, pre_norm=True).train()
    assert head.transformer.query_embed is None and head.transformer.encoder.norm is not None
    feats, masks, pos, targets = _inputs()
    out = head(feats, masks, pos, targets)
    out["pred_boxes"].sum().backward()
    assert head.transformer.enc_output.weight.grad is None  # content is the DETACHED memory


def test_decoder_loss_reaches_encoder_and_checkpointing_matches():
    feats, masks, pos, targets = _inputs()
    grads = []
    outs = []
    for checkpointing in (False, True):
        torch.manual_seed(5)
        head = _head(activation_checkpoint=checkpointing, dropout=0.1).train()
        torch.manual_seed(6)
        out = head(feats, masks, pos, targets)
        (out["pred_logits"].sigmoid().sum() + out["pred_boxes"].sum()).backward()
        enc = head.transformer.encoder.layers[0]
        assert enc.attentions[0].value_proj.weight.grad.abs().sum() > 0
        assert enc.ffns[0].layers[1].weight.grad.abs().sum() > 0
        # (level_embeds only enter through the offset/weight projections, zero at init: no grad yet.)
        assert enc.attentions[0].sampling_offsets.weight.grad.abs().sum() > 0
        outs.append(out["pred_boxes"].detach())
        grads.append({n: p.grad for n, p in head.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_forward_positive_shapes_and_gradient_to_memory():
    torch.manual_seed(7)
    head = _head().train()
    feats, masks, pos, targets = _inputs()
    out = head(feats, masks, pos, targets)
    memory = out["memory"]
    boxes = torch.cat([torch.rand(B, 9, 2) * 0.6 + 0.2, torch.rand(B, 9, 2) * 0.3 + 0.05], -1)
    for k in range(2):
        layers = head.forward_positive(memory, boxes, k)
        assert len(layers) == 2
        for layer in layers:
            assert layer["pred_logits"].shape == (B, 9, CLASSES) and layer["pred_boxes"].shape == (B, 9, 4)
        # Zero box deltas at init: layer 0 predicts the positive boxes themselves.
        torch.testing.assert_close(layers[0]["pred_boxes"], boxes, atol=1e-4, rtol=0)
        loss = layers[-1]["pred_logits"].sigmoid().sum() + layers[-1]["pred_boxes"].sum()
        grad_mem, grad_proj = torch.autograd.grad(
            loss, [memory.memory, head.transformer.aux_pos_trans[k].weight], retain_graph=True
        )
        assert grad_mem.abs().sum() > 0 and grad_proj.abs().sum() > 0


def test_aux_feature_maps_train_the_encoder():
    torch.manual_seed(8)
    head = _head().train()
    feats, masks, pos, targets = _inputs()
    maps = head.aux_feature_maps(head(feats, masks, pos, targets)["memory"])
    torch.testing.assert_close(maps[0], head(feats, masks, pos, None)["memory"].memory[:, :64].transpose(1, 2)
                               .reshape(B, HIDDEN, 8, 8))
    sum(m.square().mean() for m in maps).backward()
    assert head.transformer.encoder.layers[0].attentions[0].value_proj.weight.grad.abs().sum() > 0
    assert head.downsample[0].weight.grad.abs().sum() > 0


def test_state_dict_names_follow_co_dino():
    keys = set(_head(num_feature_levels=5, dec_layers=2).state_dict())
    expected = [
        "transformer.level_embeds",
        "transformer.query_embed.weight",
        "transformer.enc_output.weight",
        "transformer.enc_output_norm.weight",
        "transformer.encoder.layers.0.attentions.0.sampling_offsets.weight",
        "transformer.encoder.layers.0.attentions.0.attention_weights.weight",
        "transformer.encoder.layers.0.attentions.0.value_proj.weight",
        "transformer.encoder.layers.0.attentions.0.output_proj.weight",
        "transformer.encoder.layers.0.ffns.0.layers.0.0.weight",
        "transformer.encoder.layers.0.ffns.0.layers.1.weight",
        "transformer.encoder.layers.0.norms.1.weight",
        "transformer.decoder.layers.1.attentions.0.attn.in_proj_weight",
        "transformer.decoder.layers.1.attentions.0.attn.out_proj.weight",
        "transformer.decoder.layers.1.attentions.1.sampling_offsets.weight",
        "transformer.decoder.layers.1.norms.2.weight",
        "transformer.decoder.ref_point_head.0.weight",
        "transformer.decoder.ref_point_head.2.weight",
        "transformer.decoder.norm.weight",
        "transformer.aux_pos_trans.1.weight",
        "transformer.aux_pos_trans_norm.1.weight",
        "cls_branches.2.weight",
        "reg_branches.2.4.weight",
        "reg_branches.0.0.weight",
        "label_embedding.weight",
        "downsample.0.weight",
        "downsample.1.weight",
    ]
    missing = [k for k in expected if k not in keys]
    assert not missing, missing
    head = _head(num_feature_levels=5, hidden_dim=256, nheads=8, enc_n_points=4, dec_layers=1, enc_layers=1,
                 dim_feedforward=32, num_co_heads=1)
    sd = head.state_dict()
    # Shapes of the official 5-level checkpoints.
    assert sd["transformer.encoder.layers.0.attentions.0.sampling_offsets.weight"].shape == (320, 256)
    assert sd["transformer.encoder.layers.0.attentions.0.attention_weights.weight"].shape == (160, 256)
    assert sd["transformer.aux_pos_trans.0.weight"].shape == (256, 512)
    assert sd["label_embedding.weight"].shape == (CLASSES, 256)


def test_forward_positive_references_are_the_raw_boxes(monkeypatch):
    """Parity fix 4: as mmdet's forward_aux, the content is embedded from
    sigmoid(inverse_sigmoid(box)) (clamped into [1e-5, 1 - 1e-5]) but the first reference of the
    decoder is the box itself, w > 1 included (we used to pass the clamped box to both)."""
    from codetr.boxes import inverse_sigmoid

    head = _head().train()
    feats, masks, pos, targets = _inputs()
    memory = head(feats, masks, pos, targets)["memory"]
    boxes = torch.tensor([[[0.0, 0.5, 1.6, 0.4], [0.5, 0.5, 0.2, 1.3]]]).expand(B, -1, -1)
    seen = {}
    content, decoder = head.transformer.positive_content, head.transformer.decoder.forward

    def spy_content(x, k, feats=None):
        seen["content"] = x
        return content(x, k, feats)

    def spy_decoder(query, reference, *args):
        seen["reference"] = reference
        return decoder(query, reference, *args)

    monkeypatch.setattr(head.transformer, "positive_content", spy_content)
    monkeypatch.setattr(head.transformer.decoder, "forward", spy_decoder)
    first = head.forward_positive(memory, boxes, 0)
    assert torch.equal(seen["reference"], boxes)
    assert torch.equal(seen["content"], inverse_sigmoid(boxes).sigmoid())
    # The reference matters: the same content over the clamped box predicts other logits.
    monkeypatch.setattr(head.transformer.decoder, "forward", lambda q, r, *a: decoder(q, r.clamp(0, 1), *a))
    second = head.forward_positive(memory, boxes, 0)
    assert not torch.allclose(first[0]["pred_logits"], second[0]["pred_logits"])
