"""The errors genkit raises on bad input: one line, naming the file, key or value.

The CLI prints `str(error)` of any `GenkitError` without a traceback and exits with 2.
"""


class GenkitError(Exception):
    """Base class of every user-facing error; its message is one line."""


class ConfigError(GenkitError):
    """A recipe or override is invalid (unknown key, wrong type, missing field)."""


class DataError(GenkitError):
    """A dataset is missing, empty or holds an unreadable file."""


class RunError(GenkitError):
    """A run folder is missing, incomplete, or would be overwritten."""


class SamplerError(GenkitError):
    """A sampler does not fit the family, or its options are invalid."""


class Interrupted(GenkitError):
    """Training stopped on SIGTERM / SIGINT after writing a checkpoint (CLI exit code 130)."""
