"""The study's user error (its own module: every other study module raises it)."""


class StudyError(ValueError):
    """A study file (or its overrides) is wrong; the message names the setting and the fix
    (the CLI prints it and exits with code 2, before any job starts)."""
