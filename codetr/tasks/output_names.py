"""Inference output names: contained, unambiguous and traceable to their image.

An image `sub/dir/name.ext` under an input folder gets the output stem `sub/dir/name` (prefixed by
the folder's index when several folders are given) with every component percent-encoded: each
character outside `[A-Za-z0-9_-]` becomes `%XX` (its UTF-8 bytes), `.` and `%` included. Where
two images of one folder share a stem (`a.jpg`, `a.png`) both keep their extension after a dot:
`a.jpg`, `a.png`. Encoding is injective and an encoded name never holds a dot, so the dot of the
extension form cannot be confused with the stem form, and no component can be `.` or `..`.
Collisions are impossible by construction, whatever the order or the names (on a case-sensitive
output file system). `index.json` maps every input image to its output files.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path, PurePath, PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from codetr.errors import UserError
from codetr.fileio import atomic_write_text

INDEX = "index.json"
INDEX_FORMAT = 1
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class ForeignOutputsError(UserError):
    """The inference folder holds files that no earlier codetr inference run wrote."""


def encode_component(text: str) -> str:
    """Percent-encodes every character outside `[A-Za-z0-9_-]` (UTF-8 bytes, upper-case hex)."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in text)


def output_stems(items: Sequence[Tuple[str, str]]) -> Dict[Tuple[str, str], PurePosixPath]:
    """The output stem (no extension) of every `(root, relative posix path)` image.

    Args:
        items: all images of the run (the extension rule looks at each folder's other images).
    """
    roots = list(dict.fromkeys(root for root, _ in items))
    prefix = {root: [str(i)] for i, root in enumerate(roots)} if len(roots) > 1 else {r: [] for r in roots}
    folder_stems = Counter((root, str(PurePosixPath(rel).parent), PurePosixPath(rel).stem)
                           for root, rel in items)
    stems = {}
    for root, rel in items:
        path = PurePosixPath(rel)
        name = encode_component(path.stem)
        if folder_stems[(root, str(path.parent), path.stem)] > 1:
            name += "." + encode_component(path.suffix[1:])
        parents = [encode_component(p) for p in path.parent.parts]
        stems[(root, rel)] = PurePosixPath(*prefix[root], *parents, name)
    return stems


def _listed_outputs(out_dir: Path) -> Optional[List[str]]:
    """The output files an earlier run's index lists (None: no readable index)."""
    try:
        index = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
        return [f for entry in index["images"] for f in (entry["labels"], entry.get("annotated")) if f]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_previous_outputs(out_dir: str | os.PathLike, output_folders: Iterable[str]) -> int:
    """Removes what an earlier inference run wrote to `out_dir` (as its index lists them).

    Returns:
        the number of files removed.

    Raises:
        ForeignOutputsError: the output folders hold files that no index lists (another tool's,
            or a run of an older codetr): nothing is removed; the message names a few.
    """
    out_dir = Path(out_dir)
    present = [p for folder in output_folders if (out_dir / folder).is_dir()
               for p in (out_dir / folder).rglob("*") if p.is_file() or p.is_symlink()]
    if not present:
        return 0
    listed = set(_listed_outputs(out_dir) or [])
    foreign = [p for p in present if p.relative_to(out_dir).as_posix() not in listed]
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:3])
        raise ForeignOutputsError(
            f"the inference results folder {out_dir} already holds {len(foreign)} files that no "
            f"earlier codetr inference run lists in {out_dir / INDEX} (e.g. {shown}); empty the "
            "folder or set inference.results_dir to another one, so old and new outputs cannot mix")
    for path in present:
        path.unlink()
    for folder in output_folders:  # deepest first: empty folders left by the old run
        for d in sorted((out_dir / folder).rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return len(present)


def write_index(out_dir: str | os.PathLike, entries: List[dict], complete: bool) -> None:
    """Writes `index.json`: {format, complete, images: [{image, labels, annotated, detections}]}.

    Written before the first output (complete false) so a crashed run's files are still known to
    the next run, and again at the end.
    """
    atomic_write_text(Path(out_dir) / INDEX, json.dumps(
        {"format": INDEX_FORMAT, "complete": complete, "images": entries}, indent=1, ensure_ascii=False))


def relative_output(stem: PurePath, folder: str, suffix: str) -> str:
    """`<folder>/<stem><suffix>` as a posix path relative to the results folder."""
    return f"{folder}/{stem.as_posix()}{suffix}"
