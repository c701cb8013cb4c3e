"""Exceptions the core raises for problems a user can fix (bad folders, files or inputs)."""


class EasyAnimateError(Exception):
    """Base class: a message meant to be shown to the user as is."""


class ModelFolderError(EasyAnimateError, FileNotFoundError):
    """The model folder or one of its files is missing."""


class CheckpointError(EasyAnimateError, ValueError):
    """A weights file is unreadable, truncated, or does not fit the model."""


class UnsupportedRequestError(EasyAnimateError, ValueError):
    """The loaded model kind cannot do what was asked, or an input is malformed."""
