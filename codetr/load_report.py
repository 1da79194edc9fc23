"""`LoadReport`: what matching a state dict against a module did, for every loader of codetr.

Backbone weight files (`codetr.model.pretrained`) and codetr checkpoints (`codetr.tasks.checkpoint`:
fine-tuning starts, evaluate/inference restores) report through this one type; the official-
checkpoint importer's `codetr.zoo.report.ImportReport` adds what only an import has (the name
map, the keys dropped on purpose, the checkpoint's flavour) and lists keys the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

Shape = Tuple[int, ...]


def show_keys(keys: Sequence[str], limit: int) -> str:
    """The first `limit` keys, comma-separated, and how many more there are."""
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@dataclass
class LoadReport:
    """The outcome of matching checkpoint tensors to a module's by name and shape.

    Attributes:
        source: the file the tensors came from ('' when not from a file).
        loaded: module keys that receive a tensor (same name, same shape).
        missing: module keys the checkpoint has nothing for (left as initialised).
        unexpected: checkpoint keys that match no module key.
        mismatched: `(module key, checkpoint shape, module shape)` for same-name tensors whose
            shapes differ (not loaded).
    """

    source: str = ""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Shape, Shape]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        """A few lines: the count loaded, then up to `limit` keys of each kind that did not load."""
        lines = [f"loaded {len(self.loaded)} tensors" + (f" from {self.source}" if self.source else "")]
        if self.missing:
            lines.append(f"missing in the checkpoint ({len(self.missing)}): "
                         f"{show_keys(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"unexpected in the checkpoint ({len(self.unexpected)}): "
                         f"{show_keys(self.unexpected, limit)}")
        if self.mismatched:
            shown = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            lines.append(f"shape mismatch, skipped ({len(shown)}): {show_keys(shown, limit)}")
        return "\n".join(lines)
