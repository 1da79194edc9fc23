"""The experiment spec: schema, loading with overrides, validation."""
from codetr.spec.errors import SpecError
from codetr.spec.load import load_spec, save_spec, spec_from_dict, spec_to_dict, spec_to_yaml
from codetr.spec.schema import (AugmentationConfig, DatasetConfig, DataSource, EMAConfig,
                                EvaluateConfig, ExperimentSpec, InferDataSource, InferenceConfig,
                                ModelConfig, OptimConfig, TrainConfig)

__all__ = [
    "SpecError", "load_spec", "save_spec", "spec_from_dict", "spec_to_dict", "spec_to_yaml", "ExperimentSpec",
    "ModelConfig", "DatasetConfig", "DataSource", "InferDataSource", "AugmentationConfig",
    "TrainConfig", "OptimConfig", "EMAConfig", "EvaluateConfig", "InferenceConfig",
]
