"""The assembled Co-DETR: co-heads train the encoder, cost nothing at inference, stable names."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from codetr.model.builder import build_criterion, build_model
from codetr.spec import load_spec

TINY = ["model.backbone=resnet_18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=12", "model.dn_number=6",
        "model.co_head_num_convs=1", "model.num_feature_levels=3", "model.return_interm_indices=[1,2,3]",
        "train.activation_checkpoint=false"]


def tiny_spec(*extra):
    return load_spec(None, TINY + list(extra))


def random_batch(batch=2, h=64, w=96, num_classes=3):
    images = torch.randn(batch, 3, h, w)
    masks = torch.zeros(batch, h, w, dtype=torch.bool)
    masks[-1, :, w - 24:] = True  # the last image is narrower: padded on the right
    targets = []
    for i in range(batch):
        n = int(torch.randint(1, 4, ()))
        cxcy = torch.rand(n, 2) * 0.6 + 0.2
        wh = torch.rand(n, 2) * 0.3 + 0.05
        size = torch.tensor([h, w - (24 if i == batch - 1 else 0)])
        targets.append({"boxes": torch.cat([cxcy, wh], 1), "labels": torch.randint(0, num_classes, (n,)),
                        "size": size, "orig_size": size.clone(), "image_id": i + 1})
    return images, masks, targets


def test_co_head_losses_reach_the_encoder():
    model = build_model(tiny_spec("model.num_co_heads=2"), num_classes=3).train()
    images, masks, targets = random_batch()
    out = model(images, masks, targets)
    assert {"loss_cls_co0", "loss_bbox_co0", "loss_centerness_co0", "loss_cls_co1"} <= set(out["co_losses"])
    assert len(out["pos_outputs"]) == 2
    sum(out["co_losses"].values()).backward()  # ATSS losses alone
    enc = model.query_head.transformer.encoder
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_positive_query_losses_are_computed_and_finite():
    spec = tiny_spec("model.num_co_heads=1")
    model = build_model(spec, num_classes=3).train()
    criterion = build_criterion(spec, num_classes=3)
    images, masks, targets = random_batch()
    losses = criterion(model(images, masks, targets), targets)
    assert {"loss_ce_pos0_0", "loss_bbox_pos0_1", "loss_giou_pos0_1", "loss_ce_dn", "loss_ce_interm"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def _inference_params(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()
            if not n.startswith("bbox_head.") and ".aux_pos_trans" not in n and not n.startswith("query_head.downsample")}


def test_no_co_heads_is_plain_dino_with_equal_inference_cost():
    torch.manual_seed(0)
    dino = build_model(tiny_spec("model.num_co_heads=0"), num_classes=3).eval()
    torch.manual_seed(0)
    co = build_model(tiny_spec("model.num_co_heads=2"), num_classes=3).eval()
    names = [n for n, _ in dino.named_parameters()]
    assert not any(n.startswith(("bbox_head", "query_head.downsample")) or "aux_pos_trans" in n for n in names)
    assert len(co.bbox_head) == 2 and any("aux_pos_trans" in n for n, _ in co.named_parameters())
    assert _inference_params(co) == _inference_params(dino)
    assert sum(p.numel() for p in dino.parameters()) == sum(
        torch.Size(s).numel() for s in _inference_params(co).values())
    images, masks, _ = random_batch()
    flops = []
    for model in (dino, co):
        with FlopCounterMode(display=False) as counter:
            out = model(images, masks)
        flops.append(counter.get_total_flops())
        assert set(out) == {"pred_logits", "pred_boxes"}
    assert flops[0] == flops[1] > 0


def test_state_dict_names_follow_the_official_checkpoints():
    model = build_model(tiny_spec("model.num_co_heads=1", "model.num_feature_levels=4",
                                  "model.return_interm_indices=[1,2,3,4]"), num_classes=3)
    keys = set(model.state_dict())
    expected_prefixes = [
        "backbone.", "neck.convs.0.conv.", "neck.convs.0.gn.", "neck.extra_convs.",
        "query_head.transformer.level_embeds", "query_head.transformer.query_embed.weight",
        "query_head.transformer.enc_output.", "query_head.transformer.enc_output_norm.",
        "query_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight",
        "query_head.transformer.encoder.layers.0.attentions.0.attention_weights.weight",
        "query_head.transformer.encoder.layers.0.attentions.0.value_proj.weight",
        "query_head.transformer.encoder.layers.0.attentions.0.output_proj.weight",
        "query_head.transformer.encoder.layers.0.ffns.0.",
        "query_head.transformer.encoder.layers.0.norms.1.",
        "query_head.transformer.decoder.layers.1.attentions.0.attn.in_proj_weight",
        "query_head.transformer.decoder.layers.1.attentions.1.sampling_offsets.weight",
        "query_head.transformer.decoder.layers.1.norms.2.",
        "query_head.transformer.decoder.ref_point_head.",
        "query_head.transformer.aux_pos_trans.0.", "query_head.transformer.aux_pos_trans_norm.0.",
        "query_head.cls_branches.2.", "query_head.reg_branches.2.4.", "query_head.downsample.0.",
        "query_head.label_embedding.weight",
        "bbox_head.0.cls_convs.0.", "bbox_head.0.reg_convs.0.", "bbox_head.0.atss_cls.",
        "bbox_head.0.atss_reg.", "bbox_head.0.atss_centerness.", "bbox_head.0.scales.0.",
    ]
    missing = [p for p in expected_prefixes if not any(k.startswith(p) for k in keys)]
    assert not missing, f"state-dict names drifted from the official layout: {missing}"
