"""KITTI label lines as TAO writes them.

Reference: TAO's DETR-family inference writer (tao_pytorch_backend,
nvidia_tao_pytorch/cv/deformable_detr/model/post_process.py, `save_inference_prediction`), whose
line is `name + " 0.00 0 0.00 "`, the box `f"{x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f}"`, then
`f" 0.00 0.00 0.00 0.00 0.00 0.00 0.00 {score:.3f}"`; re-typed here as the expected string.
"""
import numpy as np

from codetr.tasks.kitti import format_kitti_line, parse_kitti_line


def _tao_line(class_name: str, box, score: float) -> str:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (class_name + " 0.00 0 0.00 " + f"{x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f}"
            + f" 0.00 0.00 0.00 0.00 0.00 0.00 0.00 {score:.3f}")


def test_lines_match_taos_writer():
    for _ in range(20):
        (x1, x2), (y1, y2) = np.sort(np.random.uniform(0, 2000, size=(2, 2)), axis=1)
        box = [x1, y1, x2, y2]
        score = float(np.random.uniform())
        assert format_kitti_line("car", box, score) == _tao_line("car", box, score)


def test_three_decimals_survive_a_round_trip():
    box = np.random.uniform(0, 1000, size=4)
    score = float(np.random.uniform())
    obj = parse_kitti_line(format_kitti_line("traffic light", box, score))
    assert obj.name == "traffic_light"
    # 3 decimals: each value rounds by at most 5e-4 (+ float64 formatting, < 1e-12 here)
    np.testing.assert_allclose(obj.box_xyxy, box, rtol=0, atol=5e-4 + 1e-9)
    assert abs(obj.score - score) <= 5e-4 + 1e-9
