"""The one exception type factnet raises for bad input."""

__all__ = ["FactnetError"]


class FactnetError(ValueError):
    """A request factnet cannot honour: the message says what was expected, what was got,
    and what to do instead."""
