"""The one base of every error a user can fix by editing their input.

A spec value, a data file, a checkpoint, a folder, a full disk: the CLI prints the message (which
names the file, key or value and what is allowed) and exits with status 2, without a traceback. A
traceback is kept for codetr's own bugs. Concrete errors also derive from the builtin type a caller
would expect (`ValueError`, `FileNotFoundError`, `OSError`, ...), so `except ValueError` still works.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or environment that the user can fix; the message says what and where."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder named by the spec or the data does not exist (the message names it)."""


class UnwritableOutputError(UserError, PermissionError):
    """An output folder cannot be created or written (the message names it and the key)."""


class DiskFullError(UserError, OSError):
    """No space left where codetr writes (the message names the file and the free space)."""


class OutOfMemoryAdviceError(UserError, RuntimeError):
    """The run needs more memory than the device has; the message lists the spec keys that cut it."""


class InputValueError(UserError, ValueError):
    """A value read from the user's input (data, spec, classmap, colours) is not allowed."""
