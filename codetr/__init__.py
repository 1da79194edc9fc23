"""codetr: Co-DETR (Co-DINO) object detection: train, evaluate, inference."""
__version__ = "0.1.0"
