"""Post-processing of the query head: top-k detections and (optional) soft-NMS."""
from codetr.postprocess.postprocess import PostProcess
from codetr.postprocess.soft_nms import batched_soft_nms, soft_nms

__all__ = ["PostProcess", "batched_soft_nms", "soft_nms"]
