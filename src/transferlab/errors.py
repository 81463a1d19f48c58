"""One exception type for mistakes a user can fix: the CLI prints its message, not a traceback."""


class UserError(Exception):
    """Bad input (path, checkpoint, override): the message names the problem and the fix."""


def user_message(err: BaseException) -> str:
    """A UserError's own message, also when PyTorch's DataLoader re-raised it from a worker process (its text
    then holds the worker's traceback, and the original message on the last line)."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return text
