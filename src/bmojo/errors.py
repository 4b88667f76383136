"""The package's user-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class BMojoError(Exception):
    """Bad input or a setting that cannot work: the message says what and where, in one line."""

    exit_code = 2


class TrainingDiverged(BMojoError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3
