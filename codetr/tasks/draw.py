"""Annotated images: boxes in per-class colours with class and score text (PIL)."""
from __future__ import annotations

import colorsys
from typing import Dict, List, Mapping, Sequence, Tuple

from PIL import Image, ImageColor, ImageDraw, ImageFont

from codetr.spec.errors import SpecError

RGB = Tuple[int, int, int]


def parse_color(value: str) -> RGB:
    """A colour name ('red') or hex string ('#ff0000', 'ff0000', '#f00') -> (r, g, b).

    Raises:
        ValueError: the value is neither a known name nor a hex colour.
    """
    text = value.strip()
    if len(text) in (3, 6) and all(c in "0123456789abcdefABCDEF" for c in text):
        text = "#" + text
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise SpecError(f"inference.color_map: '{value}' is not a colour name or hex code "
                         f"(e.g. red, '#ff8800')") from None


def default_palette(n: int) -> List[RGB]:
    """`n` well-separated saturated colours (golden-ratio hue steps), stable per class index."""
    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def class_colors(names: Sequence[str], color_map: Mapping[str, str]) -> Dict[str, RGB]:
    """Colour of every class name: `color_map` where given, else the default palette.

    Raises:
        ValueError: `color_map` names a class that is not in `names`, or an unknown colour.
    """
    unknown = sorted(set(color_map) - set(names))
    if unknown:
        raise SpecError(f"inference.color_map names unknown classes {unknown}; "
                         f"classes are: {', '.join(names)}")
    palette = default_palette(len(names))
    return {name: parse_color(color_map[name]) if name in color_map else palette[i]
            for i, name in enumerate(names)}


def draw_detections(image: Image.Image, boxes_xyxy: Sequence[Sequence[float]], names: Sequence[str],
                    scores: Sequence[float], colors: Mapping[str, RGB],
                    outline_width: int = 3) -> Image.Image:
    """Returns an RGB copy of `image` with each box outlined and labelled `name score`.

    Args:
        image: the original image.
        boxes_xyxy: `[K, 4]` xyxy in pixels of `image`.
        names: `K` class names.
        scores: `K` confidences.
        colors: class name -> RGB.
        outline_width: box line width in pixels.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for box, name, score in zip(boxes_xyxy, names, scores):
        x1, y1, x2, y2 = (float(v) for v in box)
        color = colors.get(name, (255, 0, 0))
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=outline_width)
        text = f"{name} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        # Put the label above the box when there is room, inside it otherwise.
        dy = bottom - top + 2
        ty = y1 - dy if y1 - dy >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + dy], fill=color)
        draw.text((x1 + 2, ty), text, fill=_text_color(color), font=font)
    return out


def _text_color(background: RGB) -> RGB:
    """Black on light colours, white on dark ones (perceived luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
