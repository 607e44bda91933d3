"""The error type for mistakes a user can fix: the CLI prints it as one line, without a traceback."""


class UserError(Exception):
    """Bad input (a file, flag or value): the message names it and says what would be valid."""
