"""The one error type for a bad spec: the CLI prints its message and exits with status 2."""


class SpecError(ValueError):
    """A spec value, key or override is invalid; the message names the dotted key and what is allowed."""
