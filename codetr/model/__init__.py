"""codetr.model: backbone, neck, transformer, heads and the top-level Co-DETR model.

Kept import-free on purpose: importing the package must not pull in timm or build anything;
import the submodule you need (``from codetr.model.backbone import Backbone``).
"""
