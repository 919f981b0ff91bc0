"""One exception type for mistakes a user can fix; the CLI prints its text as one paragraph."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do. Exit code 2."""

    exit_code = 2
