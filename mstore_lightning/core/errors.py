"""Errors every part may raise."""


class StoreReadError(ValueError):
    """The store, an epoch, a layer or a sample asked for is not there, or cannot be read as asked."""


class StoreExistsError(FileExistsError):
    """The store path already holds a store and the mode does not allow touching it."""


class IncompatibleStoreError(ValueError):
    """An existing store cannot take this run's data (another schema or another set of layers)."""
