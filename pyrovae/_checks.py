"""Argument checks shared by the modules: fail early with the name and the value."""


def check_int(name: str, value, minimum: int = 1):
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value
