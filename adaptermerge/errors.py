"""Error and warning classes.

Every error subclasses :class:`AdapterMergeError`; errors caused by the user's input are also
:class:`ValueError`, so handlers written for peft and diffusers keep catching them.
"""

from __future__ import annotations


class AdapterMergeError(Exception):
    """Base class of every error raised by adaptermerge."""


class AdapterFormatError(AdapterMergeError, ValueError):
    """A file or state dict is not a readable adapter: unknown format, bad keys, empty or truncated."""


class UnsafeFormatError(AdapterFormatError):
    """A pickle checkpoint was given without ``allow_pickle=True`` (unpickling can run code)."""


class InvalidTensorError(AdapterMergeError, ValueError):
    """A tensor holds NaN or Inf, or has the wrong number of dimensions."""


class IncompatibleAdaptersError(AdapterMergeError, ValueError):
    """Adapters disagree on a module's shape or on the base model, or a method cannot take them."""


class UnknownMethodError(AdapterMergeError, ValueError):
    """No merge method is registered under the given name."""


class InvalidParameterError(AdapterMergeError, ValueError):
    """A method parameter or weight is out of range, or an unknown parameter was passed."""


class IncompatibleVersionsError(AdapterMergeError, ImportError):
    """Installed host libraries refuse each other (e.g. a transformers that demands a newer peft)."""


class OutputExistsError(AdapterMergeError, FileExistsError):
    """The output path exists and ``overwrite`` was not set.

    Args:
        message (`str`): the message, in the Python API's spelling (`overwrite=True`).
        path (`str` or `Path`, *optional*): the output, so the command line can say it in its own spelling.
    """

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class OutputPathError(AdapterMergeError, ValueError):
    """The output path is, contains or lies inside one of the inputs, or a folder stands where a file would go."""


class WriteError(AdapterMergeError, OSError):
    """An output could not be written: no space left on the device, no permission, a read-only file system."""


class NotFittedError(AdapterMergeError, ValueError, AttributeError):
    """An estimator-like helper was used before ``fit``."""


class AdapterMergeWarning(UserWarning):
    """Warnings about input that was ignored, approximated or is likely a mistake."""
