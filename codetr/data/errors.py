"""The data errors and warnings: what the user must fix, what was repaired on the way."""
from __future__ import annotations

from codetr.errors import InputValueError


class CocoFormatError(InputValueError):
    """The annotation file breaks the COCO format or our rules; the message names file and entry."""


class DataWarning(UserWarning):
    """Annotations or images were repaired or dropped while loading (the message gives counts)."""
