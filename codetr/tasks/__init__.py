"""The tasks: train (Lightning), evaluate (COCO metrics), inference (KITTI + images) and
import_mmdet (an official checkpoint in codetr's format).

Each of `codetr.tasks.train`, `.evaluate`, `.inference` and `.import_mmdet` exposes `run(spec) -> int`, called by
`codetr.cli`. The modules are imported lazily by the CLI: importing this package stays cheap.
"""
