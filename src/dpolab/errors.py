"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with code 2."""


class DpolabError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class ConfigError(DpolabError):
    """A bad config key or value."""


class DataError(DpolabError):
    """Malformed input data; the message names the file and line."""


class RunFolderError(DpolabError):
    """A folder that is not (or no longer) a valid dpolab run, sweep or export."""
