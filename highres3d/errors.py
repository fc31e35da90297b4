"""Exceptions that the CLI turns into one clear line instead of a traceback."""


class Highres3dError(Exception):
    """Base class: a problem the user can fix (bad config, bad file, missing data)."""


class ConfigError(Highres3dError, ValueError):
    """A configuration file or value is invalid; the message names the key path."""


class DataError(Highres3dError, ValueError):
    """An input file or dataset is unusable; the message names the file."""


class WorkerError(Highres3dError):
    """One or more worker processes failed; the message names each, its exit code and its error.

    Attributes:
        failed: ``(worker index, exit code)`` of every failed worker.
    """

    def __init__(self, message: str, failed: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.failed = list(failed or [])
