"""The one exception type for bad input.

Library code raises `UserError` with a message that says what is wrong and what to do; the command line turns
it into one line on stderr and exit code 2 (click's usage-error code), never a traceback.
"""


class UserError(Exception):
    """Bad input from the user (missing file, wrong checkpoint, mismatched store, bad value)."""
