"""`_f`: a spec field with its default and the validation constraints `codetr.spec.validate` reads."""
from __future__ import annotations

from dataclasses import field


def _f(default, **constraints):
    """A field with a default (copied for lists/dicts) and validation constraints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=constraints)
    return field(default=default, metadata=constraints)
