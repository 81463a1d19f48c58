"""One exception type for mistakes a user can fix: the CLI prints its message, not a traceback."""


def _without_worker_traceback(text: str) -> str:
    """PyTorch's DataLoader re-raises a worker's exception as `type(text)` where `text` holds the worker's
    traceback and, on its last line, the original message: keep only that message."""
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return text


class UserError(Exception):
    """Bad input (path, checkpoint, override): the message names the problem and the fix."""

    def __init__(self, message: str = ""):
        super().__init__(_without_worker_traceback(str(message)))


def user_message(err: BaseException) -> str:
    """An exception's message without a DataLoader worker's traceback (see `_without_worker_traceback`)."""
    return _without_worker_traceback(str(err))
