"""Errors that carry a message meant for the user: the CLIs print them without a traceback."""


class DyndepthError(Exception):
    """Base class: bad input that the user can fix (the message says how)."""


class ConfigError(DyndepthError):
    """A config field is unknown, has the wrong type, or is out of range."""


class DatasetError(DyndepthError):
    """A dataset is missing, unreadable or inconsistent."""


class CheckpointError(DyndepthError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class OutputError(DyndepthError):
    """An output file (metrics, report) could not be written; the previous file is unchanged."""
