"""peftkit's exceptions. Every error a user can cause is one of these, with one message that names the
field or file, what was expected, and what to do."""


class PeftkitError(Exception):
    """Base class of every error peftkit raises for bad input."""


class ConfigError(PeftkitError, ValueError):
    """A bad option, method name, target pattern or recipe key."""


class CheckpointError(PeftkitError, ValueError):
    """A missing, corrupt, truncated or mismatched adapter checkpoint."""


class StateError(PeftkitError, RuntimeError):
    """An operation that the model's current state does not allow (wrapping twice, merging twice...)."""


class MergeError(StateError, ValueError):
    """A merge that would write NaN or inf into the base weights (``safe=True``); nothing was changed."""
