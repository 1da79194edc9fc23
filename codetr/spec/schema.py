"""The experiment spec: one typed dataclass per section, defaults as in TAO Co-DETR.

Names, defaults and supported values follow NVIDIA TAO 7.0.1's Co-DETR documentation (the model,
dataset, train, evaluate and inference tables), with DINO's dataset/augmentation/optim fields that
Co-DETR reuses, plus `enable_ema`/`ema`, `optim.warmup_steps`, `precision: bf16` and `is_dry_run`
from TAO RT-DETR. Constraints live in each field's metadata and are enforced by
`codetr.spec.validate`: `choices` (allowed values), `min`/`max` (inclusive bounds), `gt` (strict
lower bound), `each` (constraint on each list item).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

BACKBONES = (
    "swin_large_224_22k", "swin_large_384_22k", "swin_large_patch4_window7_224",
    "swin_large_patch4_window12_384", "swin_base_224_22k", "swin_base_384_22k", "swin_tiny_224_1k",
    "fan_tiny", "fan_small", "fan_base", "fan_large",
    "resnet_18", "resnet_34", "resnet_50",
    "efficientvit_b0", "efficientvit_b1", "efficientvit_b2", "efficientvit_b3",
    "efficientnet_lite0",
    "vit_large_nvdinov2", "vit_large_dinov2", "vit_large_codetr",
)


from codetr.spec.fields import _f
from codetr.spec.schema_deploy import ExportConfig, GenTrtEngineConfig, ImportMmdetConfig


@dataclass
class ModelConfig:
    """`model`: the Co-DETR architecture, its losses and its post-processing."""
    pretrained_backbone_path: Optional[str] = _f(None)
    backbone: str = _f("swin_large_patch4_window7_224", choices=BACKBONES)
    train_backbone: bool = _f(True)
    # codetr's key (not in TAO): freeze the trunk's BatchNorm, statistics and affine, as the
    # official ResNet recipes do (mmdet's norm_eval=True, BN requires_grad=False; DETR's
    # FrozenBatchNorm2d). CNN trunks only.
    backbone_frozen_bn: bool = _f(False)
    num_feature_levels: int = _f(4, min=1, max=5)
    return_interm_indices: List[int] = _f([1, 2, 3, 4], each={"min": 0, "max": 4})
    hidden_dim: int = _f(256, gt=0)
    nheads: int = _f(8, gt=0)
    dec_layers: int = _f(6, gt=0)
    enc_layers: int = _f(6, gt=0)
    num_queries: int = _f(900, min=1, max=2000)
    dim_feedforward: int = _f(2048, gt=0)
    dec_n_points: int = _f(4, gt=0)
    enc_n_points: int = _f(4, gt=0)
    num_select: int = _f(300, gt=0)
    pre_norm: bool = _f(False)
    two_stage_type: str = _f("standard", choices=("standard", "no"))
    decoder_sa_type: str = _f("sa", choices=("sa", "ca_label", "ca_content"))
    embed_init_tgt: bool = _f(True)
    # codetr's key: where the decoder's positional queries come from. ref_point_head = DINO /
    # Co-DINO (from each layer's refined box); proposal = Deformable DETR / Co-Deformable-DETR
    # (from the selected encoder proposals, fixed for every layer; needs two_stage_type=standard
    # and use_dn=false).
    decoder_query_pos: str = _f("ref_point_head", choices=("ref_point_head", "proposal"))
    # codetr's key: how two_stage_type=standard classifies its encoder proposals. per_class = DINO /
    # Co-DINO (ranked by the best class logit, the top-k supervised with the gt classes);
    # class_agnostic = Deformable DETR / Co-Deformable-DETR (ranked by class 0's logit, every
    # location supervised with all gt labelled 0).
    encoder_proposal_classes: str = _f("per_class", choices=("per_class", "class_agnostic"))
    fix_refpoints_hw: int = _f(-1)
    pe_temperatureH: int = _f(20, gt=0)
    pe_temperatureW: int = _f(20, gt=0)
    # codetr's key (not in TAO): added to the pixel position before normalisation; -0.5 is mmdet's
    # Deformable DETR / Co-Deformable-DETR (SinePositionalEncoding offset), 0 DINO's and Co-DINO's.
    pe_offset: float = _f(0.0, min=-1.0, max=1.0)
    dropout_ratio: float = _f(0.0, min=0.0, max=1.0)
    dilation: bool = _f(False)
    use_dn: bool = _f(True)
    dn_number: int = _f(100, gt=0)
    dn_box_noise_scale: float = _f(1.0, min=0.0)
    dn_label_noise_ratio: float = _f(0.5, min=0.0, max=1.0)
    cls_loss_coef: float = _f(2.0, min=0.0)
    bbox_loss_coef: float = _f(5.0, min=0.0)
    giou_loss_coef: float = _f(2.0, min=0.0)
    focal_alpha: float = _f(0.25, gt=0.0)
    cls_loss_type: str = _f("focal", choices=("focal", "quality_focal"))
    # Not in TAO: the query-head class-loss weight apart from the matching cost (null: cls_loss_coef).
    cls_loss_weight: Optional[float] = _f(None, min=0.0)
    aux_loss: bool = _f(True)
    interm_loss_coef: float = _f(1.0, min=0.0)
    no_interm_box_loss: bool = _f(False)
    loss_types: List[str] = _f(["labels", "boxes"], each={"choices": ("labels", "boxes")})
    num_co_heads: int = _f(1, min=0, max=3)
    co_head_loss_weight: float = _f(1.0, min=0.0)
    co_head_num_convs: int = _f(4, gt=0)
    # Not in TAO: Co-DINO's Faster R-CNN co-head (RPN + RoI head) beside the ATSS heads.
    use_rcnn_co_head: bool = _f(False)
    # Not in TAO (mmdet's name): a positive query's content also embeds its co-head's feature at
    # the anchor (ATSS: the map row; R-CNN: the RoI's mean pooled feature), and with
    # decoder_query_pos=proposal its position a per-head scalar. Co-DETR's default for
    # Co-Deformable-DETR; off in every official Co-DINO config.
    with_coord_feat: bool = _f(False)
    soft_nms_enabled: bool = _f(False)
    soft_nms_method: str = _f("linear", choices=("linear", "gaussian"))
    soft_nms_iou_threshold: float = _f(0.8, min=0.0, max=1.0)
    soft_nms_sigma: float = _f(0.5, min=0.01)


@dataclass
class DataSource:
    """A COCO annotation file and the folder its `file_name`s are relative to."""
    image_dir: str = _f("")
    json_file: str = _f("")


@dataclass
class InferDataSource:
    """Images to run inference on (a folder or a list of folders) and the class names."""
    image_dir: Union[str, List[str]] = _f("")
    classmap: Optional[str] = _f(None)


@dataclass
class AugmentationConfig:
    """`dataset.augmentation`: DINO's resize/crop/flip policy plus LSJ (`fixed_random_crop`)."""
    scales: List[int] = _f([480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], each={"gt": 0})
    input_mean: List[float] = _f([0.485, 0.456, 0.406])
    input_std: List[float] = _f([0.229, 0.224, 0.225], each={"gt": 0.0})
    horizontal_flip_prob: float = _f(0.5, min=0.0, max=1.0)
    train_random_resize: List[int] = _f([400, 500, 600], each={"gt": 0})
    train_random_crop_min: int = _f(384, gt=0)
    train_random_crop_max: int = _f(600, gt=0)
    random_resize_max_size: int = _f(1333, gt=0)
    test_random_resize: int = _f(800, gt=0)
    fixed_padding: bool = _f(True)
    fixed_random_crop: Optional[int] = _f(None, gt=0)
    pad_size_divisor: int = _f(32, gt=0)
    # Eval padding: `mask` (zeros + padding mask) or `lsj` (mmdet's LSJ test pipeline: pad to the
    # square canvas with pixel 114, no mask; codetr.data.test_padding).
    test_padding: str = _f("mask", choices=("mask", "lsj"))
    # Train padding, the same choices: `lsj` pads to the canvas with pixel 114, no mask, targets
    # normalised by the canvas (mmdet's LSJ train `Pad`; codetr.data.test_padding).
    train_padding: str = _f("mask", choices=("mask", "lsj"))


@dataclass
class DatasetConfig:
    """`dataset`: data sources, label handling, loader sizes and augmentation."""
    train_data_sources: List[DataSource] = _f([])
    val_data_sources: List[DataSource] = _f([])
    test_data_sources: Optional[DataSource] = _f(None)
    infer_data_sources: Optional[InferDataSource] = _f(None)
    num_classes: int = _f(91, gt=0)
    contiguous_labels: bool = _f(False)
    batch_size: int = _f(4, gt=0)
    workers: int = _f(8, min=0)
    train_sampler: str = _f("default_sampler", choices=("default_sampler",))
    dataset_type: str = _f("serialized", choices=("serialized", "default"))
    skip_bad_images: bool = _f(False)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)


@dataclass
class OptimConfig:
    """`train.optim`: optimizer, learning rates and schedule."""
    optimizer: str = _f("AdamW", choices=("AdamW", "SGD"))
    lr: float = _f(2e-4, gt=0.0)
    lr_backbone: float = _f(2e-5, min=0.0)
    lr_linear_proj_mult: float = _f(0.1, gt=0.0)
    momentum: float = _f(0.9, gt=0.0)
    weight_decay: float = _f(1e-4, min=0.0)
    lr_scheduler: str = _f("MultiStep", choices=("MultiStep", "StepLR"))
    lr_steps: List[int] = _f([11], each={"gt": 0})
    lr_step_size: int = _f(40, gt=0)
    lr_decay: float = _f(0.1, gt=0.0)
    warmup_steps: int = _f(0, min=0)
    layer_decay_rate: float = _f(0.65, gt=0.0, max=1.0)


FINAL_WEIGHTS = ("best", "ema", "raw")


@dataclass
class EMAConfig:
    """`train.ema`: exponential moving average of the weights (RT-DETR's schema).

    `warmup_steps`: time constant of the decay ramp; null = scaled to the run (see
    `codetr.tasks.ema.auto_warmup_steps`), 0 = no ramp. `final_weights`: what `codetr_model.pth`
    hands to evaluate/inference: the average (`ema`), the raw trained weights (`raw`), or `best`,
    the better of the two on the last validation.
    """
    decay: float = _f(0.999, gt=0.0, max=1.0)
    warmup_steps: Optional[int] = _f(None, min=0)
    final_weights: str = _f("best", choices=FINAL_WEIGHTS)


@dataclass
class TrainConfig:
    """`train`: the training task."""
    num_gpus: int = _f(1, gt=0)
    gpu_ids: List[int] = _f([0], each={"min": 0})
    num_nodes: int = _f(1, gt=0)
    seed: int = _f(1234, min=0)
    num_epochs: int = _f(12, gt=0)
    checkpoint_interval: int = _f(1, gt=0)
    validation_interval: int = _f(1, gt=0)
    resume_training_checkpoint_path: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip_grad_norm: float = _f(0.1, min=0.0)
    precision: str = _f("fp32", choices=("fp32", "fp16", "bf16"))
    distributed_strategy: str = _f("ddp", choices=("ddp", "fsdp"))
    activation_checkpoint: bool = _f(True)
    pretrained_model_path: Optional[str] = _f(None)
    freeze: List[str] = _f([])
    verbose: bool = _f(False)
    is_dry_run: bool = _f(False)
    enable_ema: bool = _f(False)
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stopping_patience: Optional[int] = _f(None, min=0)  # validations; null/0: off


@dataclass
class EvaluateConfig:
    """`evaluate`: COCO evaluation of a checkpoint on `dataset.test_data_sources`."""
    checkpoint: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)
    num_gpus: int = _f(1, gt=0)
    gpu_ids: List[int] = _f([0], each={"min": 0})
    conf_threshold: float = _f(0.0, min=0.0, max=1.0)
    input_width: Optional[int] = _f(None, gt=0)
    input_height: Optional[int] = _f(None, gt=0)


@dataclass
class InferenceConfig:
    """`inference`: KITTI labels and annotated images for `dataset.infer_data_sources`."""
    checkpoint: Optional[str] = _f(None)
    results_dir: Optional[str] = _f(None)
    num_gpus: int = _f(1, gt=0)
    gpu_ids: List[int] = _f([0], each={"min": 0})
    conf_threshold: float = _f(0.5, min=0.0, max=1.0)
    input_width: Optional[int] = _f(640, min=32)
    input_height: Optional[int] = _f(640, min=32)
    outline_width: int = _f(3, min=1)
    save_annotated_images: bool = _f(True)
    color_map: Dict[str, str] = _f({})
    category_mapping: Dict[str, List[str]] = _f({})


@dataclass
class ExperimentSpec:
    """The whole spec file."""
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gen_trt_engine: GenTrtEngineConfig = field(default_factory=GenTrtEngineConfig)
    import_mmdet: ImportMmdetConfig = field(default_factory=ImportMmdetConfig)
    encryption_key: Optional[str] = _f(None)
    results_dir: str = _f("/results")

    def task_results_dir(self, task: str) -> str:
        """`<task>.results_dir` when set, else `<results_dir>/<task>` (TAO's rule)."""
        own = getattr(self, task).results_dir
        if own:
            return own
        import os
        return os.path.join(self.results_dir, task)
