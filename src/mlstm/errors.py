"""One kind of error for everything a user can get wrong.

A `UserError` carries a single line that names the problem and the fix. The command-line entry points catch it,
print `error: <line>` to stderr and exit with status 2, so bad input never shows a traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always exactly one line
