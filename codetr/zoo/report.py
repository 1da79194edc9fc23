"""`ImportReport`: what importing an official checkpoint did, printable on one screen."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple

from codetr.load_report import Shape, show_keys


@dataclass
class ImportReport:
    """The outcome of mapping an official state dict onto a codetr model.

    Attributes:
        source: where the weights came from (a path).
        flavour: `mmdet 3.x`, `Sense-X / mmdet 2.x` or `unknown` (from `meta` and the keys).
        mapped: `(official key, codetr key)` pairs that load (same shape).
        dropped: `(official key, reason)`: left out on purpose (see `mmdet_keys`).
        unexpected: official keys that map to a name the model does not have and are on no drop
            list: a different architecture, or a gap in the map.
        missing: model keys that receive nothing (BatchNorm `num_batches_tracked` excluded).
        mismatched: `(official key, codetr key, checkpoint shape, model shape)`: not loaded; the
            class layers when fine-tuning on another class count.
    """

    source: str
    flavour: str = "unknown"
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, str, Shape, Shape]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every model tensor is loaded and every official tensor is mapped or dropped on purpose."""
        return not (self.unexpected or self.missing or self.mismatched)

    def summary(self, limit: int = 6) -> str:
        """At most about 25 lines: the counts, the drop reasons, and a few keys of each problem."""
        def keys(items: List[str]) -> str:
            return show_keys(items, limit)

        lines = [f"official Co-DINO checkpoint ({self.flavour}): {self.source}",
                 f"  mapped: {len(self.mapped)} tensors"]
        if self.dropped:
            lines.append(f"  dropped on purpose: {len(self.dropped)}")
            for reason, count in Counter(r for _, r in self.dropped).most_common():
                lines.append(f"    {count:4d} x {reason}")
        if self.mismatched:
            shown = [f"{dst} {tuple(a)} vs model {tuple(b)}" for _, dst, a, b in self.mismatched]
            lines.append(f"  shape mismatch, not loaded ({len(shown)}): {keys(shown)}")
        if self.missing:
            lines.append(f"  missing in the checkpoint, left as initialised ({len(self.missing)}): "
                         f"{keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected, no counterpart in the model ({len(self.unexpected)}): "
                         f"{keys(self.unexpected)}")
        if self.ok:
            lines.append("  every model tensor loaded")
        return "\n".join(lines)
