"""The official model zoo: load MMDetection / Sense-X Co-DINO checkpoints into codetr.

- `codetr.safe_load` (re-exported): read mmengine / mmdet files without mmengine or pickled code;
- `mmdet_keys`: the name map mmdet -> codetr and the explicit drop list;
- `swin_keys`: Sense-X's original-name Swin (SwinTransformerV1) -> mmdet's Swin names;
- `importer`: map a state dict onto a model, with an `ImportReport` (`report`);
- `restore`: rebuild a detector from an official file and the run's spec (evaluate, inference),
  and adapt official weights for fine-tuning (`train.pretrained_model_path`).

An official checkpoint is recognised by its keys (`mmdet_keys.is_official_state_dict`), never by
its file name.
"""
from codetr.zoo.importer import checkpoint_flavour, import_official
from codetr.zoo.mmdet_keys import is_official_state_dict, map_key
from codetr.zoo.report import ImportReport
from codetr.safe_load import UnsafeCheckpointError, safe_torch_load

__all__ = ["ImportReport", "UnsafeCheckpointError", "checkpoint_flavour", "import_official",
           "is_official_state_dict", "map_key", "safe_torch_load"]
