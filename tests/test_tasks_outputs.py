"""KITTI lines, safe output paths and drawing."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from codetr.tasks.draw import class_colors, default_palette, draw_detections, parse_color
from codetr.tasks.kitti import format_kitti_line, kitti_name, kitti_text, parse_kitti_line


def test_kitti_line_round_trip():
    rng = np.random.default_rng(0)
    box = rng.uniform(0, 500, size=4)
    line = format_kitti_line("traffic light", box, 0.87654)
    fields = line.split(" ")
    assert len(fields) == 16 and fields[0] == "traffic_light"
    assert fields[1:4] == ["0.00", "0", "0.00"] and fields[8:15] == ["0.00"] * 7
    obj = parse_kitti_line(line)
    np.testing.assert_allclose(obj.box_xyxy, box, atol=5e-4)  # 3 decimals (TAO's)
    assert obj.score == pytest.approx(0.877)
    assert kitti_name("  a\tb  c ") == "a_b_c"
    assert kitti_text([]) == "" and kitti_text(["x"]) == "x\n"
    with pytest.raises(ValueError):
        parse_kitti_line("car 1 2 3")


def test_colors_and_drawing(tmp_path):
    assert parse_color("red") == (255, 0, 0)
    assert parse_color("#00ff80") == (0, 255, 128) and parse_color("00ff80") == (0, 255, 128)
    with pytest.raises(ValueError, match="color_map"):
        parse_color("notacolour")
    palette = default_palette(6)
    assert len(set(palette)) == 6
    colors = class_colors(["car", "person"], {"person": "blue"})
    assert colors["person"] == (0, 0, 255) and colors["car"] == palette[0]
    with pytest.raises(ValueError, match="unknown classes"):
        class_colors(["car"], {"truck": "red"})

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    out = draw_detections(image, [[10, 20, 50, 55]], ["person"], [0.9], colors, outline_width=2)
    px = np.asarray(out)
    assert out.size == image.size
    assert tuple(px[40, 10]) == (0, 0, 255) and tuple(px[40, 11]) == (0, 0, 255)  # left edge, 2 px
    assert tuple(px[40, 30]) == tuple(np.asarray(image)[40, 30])  # inside untouched
    path = tmp_path / "a.jpg"
    out.save(path)
    assert Image.open(Path(path)).size == (80, 60)
