"""`LabelMap`: the one place that converts COCO category ids to model label indices and back.

Two rules (docs/DESIGN.md "Labels"):

- `contiguous=True`: the K category ids sorted ascending get contiguous ids 1..K and the label index
  is `contiguous id - 1`; the model has `num_classes == K` logits.
- `contiguous=False`: the label index IS the category id (TAO's rule), so `num_classes` must exceed
  the largest category id and index 0 is never a target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from codetr.spec.errors import SpecError


@dataclass(frozen=True)
class LabelMap:
    """Category ids <-> model label indices, with the category names.

    Attributes:
        category_ids: the category ids sorted ascending (K of them).
        names: the category names in the same order.
        contiguous: which of the two rules above applies.
        num_classes: the number of class logits of the model.
    """
    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    contiguous: bool
    num_classes: int
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False)
    _index_of_label: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(int(c) for c in self.category_ids)
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"category ids must be unique and sorted ascending, got {list(ids)}")
        if len(self.names) != len(ids):
            raise ValueError(f"{len(ids)} category ids but {len(self.names)} names")
        if not ids:
            raise SpecError("the annotations define no categories; a detector needs at least one")
        if ids[0] < 0:
            raise SpecError(f"category id {ids[0]} is negative; COCO category ids start at 1")
        k = len(ids)
        if self.contiguous:
            if self.num_classes != k:
                raise SpecError(f"dataset.num_classes={self.num_classes} but the annotations have {k} "
                                f"categories; set dataset.num_classes={k}")
            labels = list(range(k))
        else:
            if ids[0] == 0:
                raise SpecError("category id 0 is reserved for the background when "
                                "dataset.contiguous_labels is false; renumber the categories from 1 "
                                f"or set dataset.contiguous_labels=true with dataset.num_classes={k}")
            if self.num_classes <= ids[-1]:
                raise SpecError(f"dataset.num_classes={self.num_classes} must be greater than the largest "
                                f"category id {ids[-1]} (dataset.contiguous_labels is false); set "
                                f"dataset.num_classes={ids[-1] + 1}, or dataset.contiguous_labels=true "
                                f"with dataset.num_classes={k}")
            labels = list(ids)
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "_label_of", dict(zip(ids, labels)))
        object.__setattr__(self, "_index_of_label", {lab: i for i, lab in enumerate(labels)})

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping], num_classes: int,
                        contiguous: bool) -> "LabelMap":
        """Builds the map from COCO `categories` entries (`{"id": int, "name": str}`), in any order."""
        cats = sorted(((int(c["id"]), str(c.get("name", c["id"]))) for c in categories))
        return cls(tuple(c[0] for c in cats), tuple(c[1] for c in cats), contiguous, num_classes)

    def label(self, category_id: int) -> int:
        """The model label index of a category id; KeyError names an unknown id."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not one of {list(self.category_ids)}") from None

    def labels(self, category_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Vectorised `label`: int64 `[N]` label indices of `[N]` category ids."""
        return np.asarray([self.label(c) for c in np.asarray(category_ids).tolist()], dtype=np.int64)

    def _index(self, label: int) -> int:
        try:
            return self._index_of_label[int(label)]
        except KeyError:
            raise KeyError(f"label index {label} has no category (num_classes={self.num_classes}, "
                           f"contiguous={self.contiguous})") from None

    def category_id(self, label: int) -> int:
        """The original COCO category id of a model label index."""
        return self.category_ids[self._index(label)]

    def name(self, label: int) -> str:
        """The category name of a model label index."""
        return self.names[self._index(label)]

    def has_label(self, label: int) -> bool:
        """Whether a label index belongs to a category (with gaps, some indices do not)."""
        return int(label) in self._index_of_label

    def category_id_lut(self) -> np.ndarray:
        """int64 `[num_classes]` table label index -> category id, -1 where no category."""
        lut = np.full(self.num_classes, -1, dtype=np.int64)
        for lab, i in self._index_of_label.items():
            lut[lab] = self.category_ids[i]
        return lut

    def with_names(self, names: Sequence[str]) -> "LabelMap":
        """The same map with other names (e.g. from a classmap file), one per category in id order."""
        return LabelMap(self.category_ids, tuple(names), self.contiguous, self.num_classes)

    def to_dict(self) -> dict:
        """Plain types only, so it can be stored in checkpoints and JSON."""
        return {"category_ids": list(self.category_ids), "names": list(self.names),
                "contiguous": self.contiguous, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LabelMap":
        """Inverse of `to_dict`."""
        return cls(tuple(int(c) for c in data["category_ids"]), tuple(data["names"]),
                   bool(data["contiguous"]), int(data["num_classes"]))
