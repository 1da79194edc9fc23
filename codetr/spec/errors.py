"""The one error type for a bad spec: the CLI prints its message and exits with status 2."""
from codetr.errors import UserError


class SpecError(UserError, ValueError):
    """A spec value, key or override is invalid; the message names the dotted key and what is allowed."""
