"""The classmap file: one class name per line, in category id order (TAO's format).

The first line names the first (smallest) category id, the second line the next one, and so on; the
number of lines is the number of foreground categories (80 for COCO, whose ids run 1..90 with gaps).
Without annotations to say which ids the lines stand for, line i is category id i (1-based).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from codetr.data.labels import LabelMap
from codetr.errors import InputValueError
from codetr.fileio import atomic_write_text


class ClassmapError(InputValueError):
    """A classmap file is missing, malformed or does not fit the label map; the message names it."""


def read_classmap(path: str | os.PathLike, where: Optional[str] = None) -> list[str]:
    """Reads the class names of a classmap file.

    Trailing blank lines are ignored; a blank line before the last name, a duplicate name or an empty
    file is an error naming the file and line. `where` is the spec key that gave `path` (e.g.
    `dataset.infer_data_sources.classmap`), named by the error when the file is missing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:  # the spec key says what to fix, the path what was looked for
        raise ClassmapError(f"{where + ': ' if where else ''}classmap file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClassmapError(f"cannot read classmap file {path}: {err}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ClassmapError(f"classmap file {path} has no class names (one name per line)")
    seen: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            raise ClassmapError(f"{path}:{number}: empty line; the classmap needs one name per line")
        if name in seen:
            raise ClassmapError(f"{path}:{number}: class name '{name}' repeats line {seen[name]}")
        seen[name] = number
    return lines


def write_classmap(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Writes one name per line (e.g. `label_map.names`, which are in category id order)."""
    for name in names:
        # read_classmap strips each line: a name must read back as written.
        if not name.strip() or "\n" in name or "\r" in name or name != name.strip():
            raise ClassmapError(f"cannot write class name {name!r} to {path}: a name must be one "
                                "non-empty line without leading or trailing white space")
    atomic_write_text(path, "".join(f"{name}\n" for name in names))


def label_map_from_classmap(path: str | os.PathLike, num_classes: int, contiguous: bool,
                            where: Optional[str] = None) -> LabelMap:
    """A label map from a classmap alone: line i (1-based) is category id i (`where`: see
    `read_classmap`)."""
    names = read_classmap(path, where)
    return LabelMap(tuple(range(1, len(names) + 1)), tuple(names), contiguous, num_classes)


def apply_classmap(label_map: LabelMap, path: str | os.PathLike) -> LabelMap:
    """Renames the categories of `label_map` with a classmap's names, which must be as many."""
    names = read_classmap(path)
    if len(names) != len(label_map.category_ids):
        raise ClassmapError(f"classmap file {path} has {len(names)} names but the model has "
                            f"{len(label_map.category_ids)} categories (ids "
                            f"{list(label_map.category_ids)}); write one name per category")
    return label_map.with_names(names)
