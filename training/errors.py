"""Errors that describe a user mistake (bad recipe, bad data row, bad argument).

The CLI prints these as one clear message without a traceback; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says where and what is allowed."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


class ModelLoadError(UserError):
    pass


class CheckpointError(UserError):
    pass


class RunInUse(UserError):
    """Another process is training, merging, exporting, evaluating or uploading the same run (training.run_lock)."""


class AnotherProcessStopped(UserError):
    """Another process of a run on several stopped while this one waited for it: its own error says
    why, and this one stops too, in one line rather than with a traceback of the lost connection."""


class OutOfMemory(UserError):
    """The device ran out of memory mid-run: the message says which setting to change."""
