"""The tasks: train (Lightning), evaluate (COCO metrics), inference (KITTI + images), export
(ONNX), gen_trt_engine (TensorRT) and import_mmdet (an official checkpoint in codetr's format).

Each of `codetr.tasks.train`, `.evaluate`, `.inference`, `.export`, `.gen_trt_engine` and
`.import_mmdet` exposes `run(spec) -> int`, called by `codetr.cli`. The modules are imported
lazily by the CLI: importing this package stays cheap.
"""
