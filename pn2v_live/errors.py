"""The one exception type for user mistakes: the CLI prints its message without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad input file); the message says how."""
