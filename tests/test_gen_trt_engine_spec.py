"""`gen_trt_engine.tensorrt`: TAO Deploy's spelling of `data_type` and its `calibration` block."""
import pytest
import torch

from codetr.cli import main
from codetr.spec import SpecError, load_spec, spec_from_dict, spec_to_dict
from codetr.tasks import gen_trt_engine

TAO_SECTION = """\
gen_trt_engine:
  onnx_file: {onnx}
  tensorrt:
    data_type: {data_type}
    workspace_size: 1024
    min_batch_size: 1
    opt_batch_size: 1
    max_batch_size: 1
    calibration:
      cal_image_dir:
        - /data/calibration/images
      cal_cache_file: /results/cal.bin
      cal_batch_size: 8
      cal_batches: 10
"""


@pytest.mark.parametrize("written,stored", [("FP32", "fp32"), ("FP16", "fp16"), ("Fp16", "fp16"),
                                            ("fp32", "fp32")])
def test_data_type_in_any_case_is_stored_lower_case(tmp_path, written, stored):
    path = tmp_path / "spec.yaml"
    path.write_text(TAO_SECTION.format(onnx="m.onnx", data_type=written))
    spec = load_spec(path)
    trt = spec.gen_trt_engine.tensorrt
    assert trt.data_type == stored
    assert (trt.calibration.cal_image_dir, trt.calibration.cal_cache_file) == \
        (["/data/calibration/images"], "/results/cal.bin")
    assert (trt.calibration.cal_batch_size, trt.calibration.cal_batches) == (8, 10)
    assert spec_from_dict(spec_to_dict(spec)).gen_trt_engine.tensorrt == trt  # saved spec reloads
    assert load_spec(None, [f"gen_trt_engine.tensorrt.data_type={written}"]).gen_trt_engine.tensorrt.data_type == stored


def test_int8_and_unknown_types_are_refused_with_the_allowed_values():
    for value in ("INT8", "int8"):
        with pytest.raises(SpecError, match=rf"gen_trt_engine.tensorrt.data_type='{value}': INT8 "
                                            r"calibration is not implemented.*Allowed values: fp32, fp16"):
            load_spec(None, [f"gen_trt_engine.tensorrt.data_type={value}"])
    with pytest.raises(SpecError, match=r"data_type='bf16' is not supported\. Allowed values: fp32, fp16"):
        load_spec(None, ["gen_trt_engine.tensorrt.data_type=bf16"])
    with pytest.raises(SpecError, match="unknown key 'gen_trt_engine.tensorrt.calibration.cal_images'"):
        load_spec(None, ["gen_trt_engine.tensorrt.calibration.cal_images=[a]"])
    with pytest.raises(SpecError, match="cal_batches"):
        load_spec(None, ["gen_trt_engine.tensorrt.calibration.cal_batches=0"])


def test_cli_exits_2_on_int8(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(TAO_SECTION.format(onnx=tmp_path / "m.onnx", data_type="INT8"))
    assert main(["gen_trt_engine", "-e", str(path)]) == 2
    assert "INT8 calibration is not implemented" in capsys.readouterr().err


def test_a_calibration_block_is_noted_as_unused(tmp_path, monkeypatch, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model_file = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_file)
    path = tmp_path / "spec.yaml"
    path.write_text(TAO_SECTION.format(onnx=model_file, data_type="FP16"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # stop right after the checks
    assert gen_trt_engine.run(load_spec(path)) == 2
    assert "tensorrt.calibration is not used" in capsys.readouterr().out
    assert gen_trt_engine.run(load_spec(None, [f"gen_trt_engine.onnx_file={model_file}"])) == 2
    assert "calibration" not in capsys.readouterr().out  # the default block says nothing
