"""The one exception type for bad input.

Library code raises `UserError` with a message that says what is wrong and what to do; the command line turns
it into one line on stderr and exit code 2 (click's usage-error code), never a traceback.
"""


class UserError(Exception):
    """Bad input from the user (missing file, wrong checkpoint, mismatched store, bad value)."""


_WRAPPED_PREFIX = "tec_pipeline.errors.UserError: "


def user_message(error: UserError) -> str:
    """The message of `error`. A UserError raised inside a DataLoader worker reaches the main process re-raised
    with the worker's traceback as its text ("Caught UserError in DataLoader worker process 0. Original
    Traceback ..."); the original message is its last line."""
    text = str(error)
    if "Original Traceback" in text:
        for line in reversed(text.splitlines()):
            if line.startswith(_WRAPPED_PREFIX):
                return line[len(_WRAPPED_PREFIX):]
    return text
