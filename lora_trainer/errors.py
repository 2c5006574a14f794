"""Errors the user can act on.

Every message is one line that names the file or option at fault and says
what to do about it; the UI shows it as it is and the command line prints it
without a traceback.
"""


class LoraTrainerError(Exception):
    """Base class: a problem with the user's input or files, not a bug."""


class CheckpointError(LoraTrainerError):
    """A checkpoint file cannot be read, is unsafe, or is not of a known kind."""


class ConfigError(LoraTrainerError, ValueError):
    """An option has a bad value, or two options cannot work together."""


class ModelError(LoraTrainerError):
    """A working model (the folder made by "Create Model") is missing or broken."""


class DiskFullError(LoraTrainerError, OSError):
    """A write ran out of disk space (the message names the folder and the space needed)."""
