"""Errors that stages raise for bad input or bad config: shown as one clear line, no traceback."""


class StageError(Exception):
    """A problem the user can fix, with the field, file or record named in the message."""


class ConfigError(StageError):
    """A config value that cannot work; the message names the key (e.g. `train.micro_batch_size`)."""


class DataError(StageError):
    """Bad input data; the message names the file and line or row."""
