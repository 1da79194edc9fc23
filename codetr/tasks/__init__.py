"""The tasks: train (Lightning), evaluate (COCO metrics), inference (KITTI + images), export
(ONNX) and gen_trt_engine (TensorRT).

Each of `codetr.tasks.train`, `.evaluate`, `.inference`, `.export` and `.gen_trt_engine` exposes
`run(spec) -> int`, called by `codetr.cli`. The modules are imported lazily by the CLI:
importing this package stays cheap.
"""
