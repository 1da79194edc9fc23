"""Deployment: ONNX export of the inference path, onnxruntime predictor, parity checks.

- `graph`: the exported modules and their input/output contract;
- `onnx_export`: `export_onnx` (trace, check, onnxslim, metadata) and `read_metadata`;
- `onnx_runtime`: `OnnxDetector` (an `.onnx` file behind `CoDETR`'s eval call), `load_detector`;
- `parity`: onnxruntime vs PyTorch eager differences.

onnx/onnxruntime/onnxslim are imported inside the functions that need them, so importing
codetr does not require them. TensorRT lives in `codetr.tasks.gen_trt_engine` only.
"""
