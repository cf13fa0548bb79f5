"""User-facing errors: the CLI prints these as one line, never a traceback."""


class UserError(Exception):
    """Bad input from the user (options, data, checkpoints). The message names what and where."""


class DataError(UserError):
    """A dataset is missing, empty, corrupt or in the wrong format."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the expected model."""


class ConfigError(UserError):
    """An option or preset value is invalid."""


class DivergenceError(UserError):
    """Training produced a non-finite loss."""
