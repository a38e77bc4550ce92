"""One exception type for user-facing errors: the CLI prints its message as one line and exits 2."""


class PrunetuneError(Exception):
    """Bad input or unsupported setup; the message says what and how to fix it."""
