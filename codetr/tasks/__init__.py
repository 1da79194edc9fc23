"""The tasks: train (Lightning), evaluate (COCO metrics) and inference (KITTI + images).

Each of `codetr.tasks.train`, `.evaluate` and `.inference` exposes `run(spec) -> int`, called by
`codetr.cli`. The modules are imported lazily by the CLI: importing this package stays cheap.
"""
