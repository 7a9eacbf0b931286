"""User-facing errors.

Every error a user can act on is a ``KogError``: the CLI prints its message as one line on
stderr and exits with code 2. Anything else escaping is a bug and keeps its traceback.
"""


class KogError(Exception):
    """An error the user can act on; the message says what, where, and what to do."""


class ModelLoadError(KogError):
    """The model path, its format, its config or its weights cannot be used."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is of an architecture kogcupy does not run."""


class InputError(KogError):
    """A prompt or a generation parameter is invalid."""


class ContextLengthError(InputError):
    """The prompt does not fit the context length (``prompt_tokens`` of it)."""

    def __init__(self, message: str, prompt_tokens: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


class DeviceError(KogError):
    """No usable GPU, not enough GPU memory, a stalled kernel, a failed compile."""
