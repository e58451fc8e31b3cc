"""User-facing errors: each one becomes a single line on stderr and exit code 2 in the CLI."""

from __future__ import annotations


class DetsegError(Exception):
    """A problem with the user's input or setup, worded as "what is wrong, and what to do"."""


class InputFileError(DetsegError):
    """A file given by the user is missing, unreadable, truncated or malformed."""


class ImageTooLargeError(InputFileError):
    """An image with more pixels than the configured cap (a possible decompression bomb)."""


class CheckpointError(DetsegError):
    """A weights file is of the wrong model, of an unknown format, or unsafe to load."""


class UnknownModelError(DetsegError):
    """A model name that is not in the registry."""
