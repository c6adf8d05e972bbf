"""Errors every part may raise."""


class StoreReadError(ValueError):
    """The store, an epoch, a layer or a sample asked for is not there, or cannot be read as asked."""
