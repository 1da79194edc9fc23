"""A `.onnx` checkpoint in evaluate / inference: the input size it is run at, and the frame of its
boxes with `dataset.augmentation.test_padding: lsj`.

Reference: PyTorch eager on the same images, on the ONNX graph's own two-stage query selection
(`forced_selection`, as codetr.export.parity: proposals tied within float noise may be ranked in
either order, and a swap is no error). Tolerance: ORT_TOL (tests/export_tolerance.py, 5e-4 in
normalised box units, measured there) times the larger side of the pixel frame, plus 1e-3 px
for the float32 products that scale the boxes (relative 1.2e-7 of <= 1300 px: ~2e-4 px).
"""
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from export_fixtures import LABEL_MAP, random_model, tiny_model_dict  # noqa: E402
from export_tolerance import ORT_TOL  # noqa: E402

from codetr.boxes import box_cxcywh_to_xyxy  # noqa: E402
from codetr.data.test_padding import LSJTestCollator, detection_sizes  # noqa: E402
from codetr.export.onnx_export import export_onnx  # noqa: E402
from codetr.export.onnx_runtime import OnnxDetector, fit_input_size  # noqa: E402
from codetr.export.parity import matched_box_diff, probe_session  # noqa: E402
from codetr.model.two_stage import forced_selection  # noqa: E402
from codetr.postprocess import PostProcess  # noqa: E402
from codetr.postprocess.postprocess import image_sizes  # noqa: E402
from codetr.spec import SpecError, spec_from_dict, spec_to_dict  # noqa: E402

DIVISOR = 32
PIXEL_ROUNDING = 1e-3  # px, see the module docstring


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny detector and two raw exports: 64x96 (multiples of 32) and 70x100 (not)."""
    model, spec = random_model(tiny_model_dict())
    root = tmp_path_factory.mktemp("onnx_inputs")
    files = {}
    for h, w in ((64, 96), (70, 100)):
        files[(h, w)] = root / f"m_{h}x{w}.onnx"
        export_onnx(model, files[(h, w)], label_map=LABEL_MAP, spec_data=spec_to_dict(spec),
                    weights="raw", height=h, width=w, batch_size=-1)
    return model, files


def _lsj_batch(size, orig_sizes):
    """An LSJ test batch of random images resized to exactly `size` (h, w), non-square originals."""
    collator = LSJTestCollator(size, DIVISOR, [0.5] * 3, [0.5] * 3)
    samples = [(torch.randn(3, *size), {"orig_size": torch.tensor(o), "size": torch.tensor(size)})
               for o in orig_sizes]
    return collator.images(samples)


def _pixels(boxes, frame):
    """cxcywh `[B, Q, 4]` normalised by `frame` `[B, 2]` (h, w) -> xyxy pixels `[B, Q, 4]`."""
    scale = frame.flip(1).repeat(1, 2)[:, None, :]  # (w, h, w, h)
    return box_cxcywh_to_xyxy(boxes.float()) * scale


@pytest.mark.parametrize("size", [(64, 96), (70, 100)])
def test_lsj_batch_gives_the_eager_pixel_boxes(exported, size):
    """The ONNX path on an LSJ batch (boxes scaled by `detection_size`) gives eager's pixel boxes.

    64x96: the canvas is the file's input, eager runs on the very same batch. 70x100: the canvas
    is 96x128 and the file sees only the 70x100 image, so eager runs on that image (no mask),
    scaled by the original size: what the ONNX path must reproduce in pixels.
    """
    model, files = exported
    h, w = size
    orig = [(int(np.random.randint(300, 900)), int(np.random.randint(300, 1300))) for _ in range(2)]
    batch = _lsj_batch(size, orig)
    assert not batch.masks.any()
    frame = detection_sizes(batch.metas)  # orig * canvas / size
    detector = OnnxDetector(files[size])
    onnx_out = detector(batch.images, batch.masks)
    session, probed = probe_session(files[size])  # + the graph's query selection as an output
    assert probed
    indices = torch.from_numpy(session.run(None, {"images": batch.images[:, :, :h, :w].numpy()})[2]).long()
    cut = tuple(batch.images.shape[-2:]) != size
    with torch.no_grad(), forced_selection(indices):
        if cut:
            eager = model(batch.images[:, :, :h, :w].contiguous(), torch.zeros(2, h, w, dtype=torch.bool))
            eager_frame = image_sizes(batch.metas)
        else:
            eager = model(batch.images, batch.masks)
            eager_frame = frame
    # eager's frame is the file's own normalisation frame in pixels (orig, = the LSJ frame at 64x96)
    bound = ORT_TOL * eager_frame.max().item() + PIXEL_ROUNDING
    diff = (_pixels(onnx_out["pred_boxes"], frame) - _pixels(eager["pred_boxes"], eager_frame)).abs().max()
    assert diff <= bound, (diff, bound)
    if cut:  # without the re-normalisation the boxes are canvas/size (~1.3-1.4x) too large
        raw = torch.from_numpy(detector.run(batch.images[:, :, :h, :w].numpy())[1])
        assert (_pixels(raw, frame) - _pixels(eager["pred_boxes"], eager_frame)).abs().max() > 10
    # The tasks' post-processing: scores within ORT_TOL, every box within the bound of its twin.
    post = PostProcess(30, False, "linear", 0.5, 0.5)
    got = post(onnx_out, frame, image_sizes(batch.metas))
    want = post(eager, eager_frame, image_sizes(batch.metas))
    stack = lambda dets, key: torch.stack([d[key] for d in dets])  # noqa: E731
    assert (stack(got, "scores") - stack(want, "scores")).abs().max() <= ORT_TOL
    assert matched_box_diff(stack(want, "scores"), stack(want, "labels"), stack(want, "boxes"),
                            stack(got, "scores"), stack(got, "labels"), stack(got, "boxes"),
                            ORT_TOL) <= bound


def _task_spec(**augmentation):
    return spec_from_dict({"dataset": {"augmentation": {"input_mean": [0.5] * 3, "input_std": [0.5] * 3,
                                                        "pad_size_divisor": DIVISOR, **augmentation}}})


def test_default_size_gives_way_to_the_files_own(exported, capsys):
    """inference's default 640x640 (TAO's) and evaluate's null take the file's size, with a
    notice; an explicit other size is refused, naming the keys and both sizes."""
    _, files = exported
    detector = OnnxDetector(files[(64, 96)])
    spec = _task_spec()
    assert (spec.inference.input_height, spec.inference.input_width) == (640, 640)
    assert fit_input_size(detector, spec, "inference", (640, 640)) == (64, 96)
    assert "takes 64x96 images: using that size, not the default" in capsys.readouterr().out
    assert fit_input_size(detector, spec, "evaluate", None) == (64, 96)
    assert "unset: using" in capsys.readouterr().out
    assert fit_input_size(detector, spec, "inference", (64, 96)) == (64, 96)
    assert capsys.readouterr().out == ""
    for task, size in (("inference", (480, 640)), ("evaluate", (640, 640))):  # evaluate's default: null
        with pytest.raises(SpecError, match=rf"{task}.input_height/input_width = {size[0]}x{size[1]}, "
                                            r"but .* takes 64x96 images"):
            fit_input_size(detector, spec, task, size)


def test_lsj_at_a_size_off_the_divisor_says_so(exported, capsys):
    _, files = exported
    assert fit_input_size(OnnxDetector(files[(70, 100)]), _task_spec(test_padding="lsj"), "evaluate",
                          (70, 100)) == (70, 100)
    assert "export at multiples of 32" in capsys.readouterr().out
    fit_input_size(OnnxDetector(files[(64, 96)]), _task_spec(test_padding="lsj"), "evaluate", (64, 96))
    assert capsys.readouterr().out == ""
