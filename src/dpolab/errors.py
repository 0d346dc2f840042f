"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with code 2."""


class DpolabError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class ConfigError(DpolabError):
    """A bad config key or value."""


class DataError(DpolabError):
    """Malformed input data; the message names the file and line."""


class RunFolderError(DpolabError):
    """A folder that is not (or no longer) a valid dpolab run, sweep or export."""


def first_line(error: BaseException | str, with_type: bool = False) -> str:
    """The first non-blank line of an error's message: what a one-line error quotes of a library's
    (often multi-line) exception. An exception with no message gives its type's name; ``with_type``
    prefixes the type (``OSError: ...``), for messages that mean little without it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if isinstance(error, str):
        return text
    name = type(error).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text
