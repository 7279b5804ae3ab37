"""Exception types, one per pipeline stage.

Every message names the file, line or field at fault and says what to do about it, so a user
can act on the error without reading our code. All of them derive from `RetrievalLoraError`,
which the command-line entry points catch to print the message without a traceback.
"""


class RetrievalLoraError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RetrievalLoraError):
    """A setting is missing, has the wrong type, or holds a value that is not allowed."""


class DataError(RetrievalLoraError):
    """A dataset file is missing, malformed or inconsistent (bad JSON, unknown id, empty text...)."""


class AdapterError(RetrievalLoraError):
    """An adapter folder is missing, corrupt, or was trained for another base model or task."""


class MiningError(RetrievalLoraError):
    """Hard-negative mining cannot run with the given corpus, queries or settings."""


class TrainingError(RetrievalLoraError):
    """Training cannot start or resume (bad checkpoint, unsupported setting combination)."""


class EvaluationError(RetrievalLoraError):
    """A run or qrels file cannot be evaluated (unknown ids, missing split, empty run)."""


class RegistryError(RetrievalLoraError):
    """The adapter registry cannot complete an operation (unknown name or version, lock held)."""
