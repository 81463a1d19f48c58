"""One exception type for mistakes a user can fix: the CLI prints its message, not a traceback."""


class UserError(Exception):
    """Bad input (path, checkpoint, override): the message names the problem and the fix."""
