"""TensorRT engines from exported ONNX files: build (Python API) and run (for the GPU test).

Imported only by `codetr gen_trt_engine` and the GPU tests: `tensorrt` is an optional extra
(`pip install 'codetr[tensorrt]'`) and needs a CUDA GPU. Written for TensorRT 10's API (named
I/O tensors, `execute_async_v3`); TensorRT 8.x needs the explicit-batch flag, set below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch


@dataclass
class EngineProfile:
    """The batch range one optimisation profile covers (H, W and C are the file's, fixed)."""
    min_batch: int
    opt_batch: int
    max_batch: int


def build_engine(onnx_file: str | os.PathLike, profile: EngineProfile, data_type: str = "fp32",
                 workspace_mib: int = 1024, verbose: bool = False) -> bytes:
    """Parses `onnx_file` and builds a serialized engine.

    Args:
        onnx_file: a `codetr export` file (standard ops only: GridSample needs TensorRT >= 8.5).
        profile: batch sizes of the optimisation profile (dynamic-batch files; a fixed-batch file
            gets its own batch size).
        data_type: `fp32` or `fp16` (FP16 kernels allowed; TensorRT picks per layer).
        workspace_mib: builder workspace limit in MiB.
        verbose: TensorRT's verbose log.

    Raises:
        RuntimeError: the parser's errors, or a failed build.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_file)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if data_type == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape[0] == -1:
            rest = shape[1:]
            opt.set_shape(tensor.name, (profile.min_batch, *rest), (profile.opt_batch, *rest),
                          (profile.max_batch, *rest))
        else:
            opt.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(opt)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see its log above)")
    return bytes(engine)


class TrtRunner:
    """Runs a serialized engine on CUDA tensors (one execution context).

    Args:
        engine: the serialized engine (`build_engine`'s bytes or an `.engine` file's).
        device: the CUDA device.
    """

    def __init__(self, engine: bytes, device: torch.device | str = "cuda") -> None:
        import tensorrt as trt

        self.device = torch.device(device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(engine)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16,
                             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}

    def __call__(self, feeds: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Named inputs (any device; copied to the GPU) -> named outputs on the GPU."""
        stream = torch.cuda.current_stream(self.device)
        keep: Sequence[torch.Tensor] = []
        for name in self.inputs:
            dtype = self._torch_dtype[self.engine.get_tensor_dtype(name)]
            tensor = feeds[name].to(self.device, dtype).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out: Dict[str, torch.Tensor] = {}
        for name in self.outputs:
            shape: Tuple[int, ...] = tuple(self.context.get_tensor_shape(name))
            dtype = self._torch_dtype[self.engine.get_tensor_dtype(name)]
            out[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out
