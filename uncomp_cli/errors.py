"""Errors a user can fix.

The library raises :class:`UncompError` (never ``assert``) for every problem caused by input:
a bad model name, a profile for another model, an empty prompt.  The CLI turns it into one line
on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UncompError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ModelNotFoundError(UncompError):
    """The model name, path or hub id cannot be resolved."""


class PromptError(UncompError):
    """The prompt is empty, too long for the model, or not valid text."""


class ProfileError(UncompError):
    """A profile file is missing, corrupt, or made for another model."""
