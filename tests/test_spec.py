"""The spec: defaults equal TAO's tables, overrides, every error class, YAML 1.1 float trap."""
import pytest

from codetr.spec import SpecError, load_spec, spec_from_dict, spec_to_yaml
from codetr.spec.yaml_io import load_yaml_text


def test_defaults_match_tao_tables():
    s = load_spec()
    m = s.model
    assert (m.backbone, m.num_feature_levels, m.return_interm_indices) == (
        "swin_large_patch4_window7_224", 4, [1, 2, 3, 4])
    assert (m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward) == (256, 8, 6, 6, 2048)
    assert (m.num_queries, m.num_select, m.dec_n_points, m.enc_n_points) == (900, 300, 4, 4)
    assert (m.two_stage_type, m.decoder_sa_type, m.embed_init_tgt, m.fix_refpoints_hw) == ("standard", "sa", True, -1)
    assert (m.pe_temperatureH, m.pe_temperatureW, m.dropout_ratio, m.dilation, m.pre_norm) == (20, 20, 0.0, False, False)
    assert (m.use_dn, m.dn_number, m.dn_box_noise_scale, m.dn_label_noise_ratio) == (True, 100, 1.0, 0.5)
    assert (m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef, m.focal_alpha) == (2.0, 5.0, 2.0, 0.25)
    assert m.cls_loss_type == "focal"  # our extension; TAO's loss is the sigmoid focal loss
    assert (m.aux_loss, m.interm_loss_coef, m.no_interm_box_loss, m.loss_types) == (True, 1.0, False, ["labels", "boxes"])
    assert (m.num_co_heads, m.co_head_loss_weight, m.co_head_num_convs) == (1, 1.0, 4)
    assert (m.soft_nms_enabled, m.soft_nms_method, m.soft_nms_iou_threshold, m.soft_nms_sigma) == (False, "linear", 0.8, 0.5)
    assert m.pretrained_backbone_path is None and m.train_backbone is True
    d = s.dataset
    assert (d.num_classes, d.contiguous_labels, d.batch_size, d.workers, d.dataset_type) == (91, False, 4, 8, "serialized")
    a = d.augmentation
    assert a.scales == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert (a.input_mean, a.input_std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert (a.horizontal_flip_prob, a.train_random_resize, a.train_random_crop_min, a.train_random_crop_max) == (0.5, [400, 500, 600], 384, 600)
    assert (a.random_resize_max_size, a.test_random_resize, a.fixed_padding, a.fixed_random_crop) == (1333, 800, True, None)
    t = s.train
    assert (t.num_gpus, t.gpu_ids, t.num_nodes, t.seed, t.num_epochs) == (1, [0], 1, 1234, 12)
    assert (t.checkpoint_interval, t.validation_interval, t.clip_grad_norm, t.precision) == (1, 1, 0.1, "fp32")
    assert (t.distributed_strategy, t.activation_checkpoint, t.freeze, t.pretrained_model_path) == ("ddp", True, [], None)
    assert (t.enable_ema, t.is_dry_run) == (False, False)
    o = t.optim
    assert (o.optimizer, o.lr, o.lr_backbone, o.lr_linear_proj_mult, o.momentum, o.weight_decay) == ("AdamW", 2e-4, 2e-5, 0.1, 0.9, 1e-4)
    assert (o.lr_scheduler, o.lr_steps, o.lr_step_size, o.lr_decay, o.warmup_steps) == ("MultiStep", [11], 40, 0.1, 0)
    e, i = s.evaluate, s.inference
    assert (e.checkpoint, e.conf_threshold, e.input_width, e.input_height, e.num_gpus) == (None, 0.0, None, None, 1)
    assert (i.conf_threshold, i.input_width, i.input_height, i.outline_width, i.save_annotated_images) == (0.5, 640, 640, 3, True)
    assert (i.color_map, i.category_mapping) == ({}, {})
    assert (s.results_dir, s.encryption_key) == ("/results", None)


def test_overrides_nested_lists_and_floats(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  backbone: resnet_50\ntrain:\n  optim:\n    lr: 1e-4\n")
    s = load_spec(path, ["train.optim.lr_backbone=1e-5", "model.return_interm_indices=[1,2,3]",
                         "model.num_feature_levels=3", "results_dir=/tmp/x", "dataset.augmentation.scales=[64,96]"])
    assert s.train.optim.lr == 1e-4 and isinstance(s.train.optim.lr, float)
    assert s.train.optim.lr_backbone == 1e-5
    assert s.model.return_interm_indices == [1, 2, 3] and s.model.backbone == "resnet_50"
    assert s.dataset.augmentation.scales == [64, 96]
    assert s.task_results_dir("train") == "/tmp/x/train"
    s2 = load_spec(path, ["results_dir=/tmp/x", "evaluate.results_dir=/elsewhere"])
    assert s2.task_results_dir("evaluate") == "/elsewhere"


def test_yaml_1_1_exponent_floats_load_as_floats():
    assert load_yaml_text("a: 1e-4\nb: 1E+3\nc: 2.0e-4\nd: .5\ne: '1e-4'") == {
        "a": 1e-4, "b": 1000.0, "c": 2e-4, "d": 0.5, "e": "1e-4"}
    # a YAML-1.1 reader (Snakemake's) yields '1e-4' strings: the spec still takes them as floats
    assert spec_from_dict({"train": {"optim": {"lr": "1e-4"}}}).train.optim.lr == 1e-4


def test_yaml_1_2_booleans_so_tao_values_stay_strings(tmp_path):
    """TAO documents `two_stage_type: no`; YAML 1.1 read it as False. Only true/false are bools."""
    assert load_yaml_text("a: no\nb: off\nc: yes\nd: true\ne: False\nf: 'no'") == {
        "a": "no", "b": "off", "c": "yes", "d": True, "e": False, "f": "no"}
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  two_stage_type: no\n")
    assert load_spec(path).model.two_stage_type == "no"
    assert load_spec(None, ["model.two_stage_type=no"]).model.two_stage_type == "no"
    with pytest.raises(SpecError, match="train.enable_ema: expected true or false, got str 'yes'"):
        load_spec(None, ["train.enable_ema=yes"])
    resolved = tmp_path / "resolved.yaml"  # the saved spec reads back the same
    resolved.write_text(spec_to_yaml(load_spec(path)))
    assert load_spec(resolved).model.two_stage_type == "no"


def test_round_trip_through_yaml(tmp_path):
    s = load_spec(None, ["train.optim.lr=3e-5", "inference.color_map={car: red}"])
    p = tmp_path / "resolved.yaml"
    p.write_text(spec_to_yaml(s))
    assert load_spec(p) == s
    assert "3.0e-05" in p.read_text()


@pytest.mark.parametrize("override, fragment", [
    ("model.backbon=resnet_50", "Did you mean 'model.backbone'"),
    ("trian.seed=1", "Did you mean 'train'"),
    ("model.num_co_heads=4", "model.num_co_heads=4 is out of range"),
    ("model.soft_nms_method=gausian", "Allowed values: linear, gaussian"),
    ("model.two_stage_type=other", "Allowed values: standard, no"),
    ("model.cls_loss_type=varifocal", "Allowed values: focal, quality_focal"),
    ("model.backbone=resnet_99", "model.backbone='resnet_99' is not supported"),
    ("train.optim.lr=fast", "train.optim.lr: expected a number"),
    ("train.num_epochs=1.5", "train.num_epochs: expected an integer"),
    ("model.use_dn=maybe", "model.use_dn: expected true or false"),
    ("model.return_interm_indices=[1,2]", "lengths must match"),
    ("model.return_interm_indices=[1,2,3,7]", "model.return_interm_indices[3]=7 is out of range"),
    ("model.dropout_ratio=1.5", "must be <= 1.0"),
    ("model.num_queries=0", "must be >= 1"),
    ("model.soft_nms_iou_threshold=-0.1", "must be >= 0.0"),
    ("train.precision=fp8", "Allowed values: fp32, fp16, bf16"),
    ("train.optim.optimizer=Adam", "Allowed values: AdamW, SGD"),
    ("dataset.dataset_type=lazy", "Allowed values: serialized, default"),
    ("model.loss_types=[labels,masks]", "model.loss_types[1]='masks'"),
    ("model.dilation=true", "dilation=true is supported for resnet backbones only"),
    ("encryption_key=secret", "encryption_key is not supported"),
    ("evaluate.input_width=640", "must be set together"),
    ("model.hidden_dim=100", "divisible by model.nheads"),
    ("dataset.augmentation.fixed_random_crop=100", "divisible by 32"),
    ("noequals", "key=value"),
    ("~train.seedd", "unknown key 'train.seedd'. Did you mean 'train.seed'?"),
    ("~train.optim.lr_bakcbone", "Did you mean 'train.optim.lr_backbone'?"),
    ("backbone=resnet_50", "Did you mean 'model.backbone'?"),
    ("report=3", "'report' is the pipeline's report stage section (a mapping"),
])
def test_errors_name_the_key_and_allowed_values(override, fragment):
    with pytest.raises(SpecError) as err:
        load_spec(None, [override])
    assert fragment in str(err.value)


def test_removing_a_key_the_file_lacks_is_a_no_op():
    """`~key` of a valid key absent from the spec (or below a free-form dict) keeps the defaults."""
    assert load_spec(None, ["~train.seed", "~inference.color_map.car", "~model.backbone"]) == load_spec(None)


def test_bad_files(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(scalar)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  num_queries: lots\n")
    with pytest.raises(SpecError, match=r"wrong.yaml: model.num_queries: expected an integer"):
        load_spec(wrong)


def test_cls_loss_weight_separates_the_class_loss_from_the_matching_cost():
    """`model.cls_loss_weight` (not in TAO): null keeps TAO's cls_loss_coef for both; the official
    Co-DINO recipes say 1.0 (QFL loss_weight) under a matching cost of 2.0."""
    from codetr.model.builder import build_criterion

    tao = build_criterion(load_spec(None, []), 5)
    assert tao.cls_loss_coef == tao.matcher.cost_class == 2.0
    official = build_criterion(load_spec(None, ["model.cls_loss_weight=1.0"]), 5)
    assert official.cls_loss_coef == 1.0 and official.matcher.cost_class == 2.0
    with pytest.raises(SpecError, match="model.cls_loss_weight"):
        load_spec(None, ["model.cls_loss_weight=-1"])
