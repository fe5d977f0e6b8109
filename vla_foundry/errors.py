"""Exceptions of the model package. Messages say what was wrong, what is allowed and the fix."""

from __future__ import annotations

import difflib


class CheckpointError(RuntimeError):
    """A checkpoint directory or file that cannot be loaded as asked."""


class InvalidInputError(ValueError):
    """A request value the model cannot take; ``field`` names it for the caller."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InputTooLargeError(InvalidInputError):
    """A request value over a size limit (image pixels, encoded bytes); HTTP 413."""


class StaleObservationError(InvalidInputError):
    """An observation older than the policy's freshness limit: acting on it would be unsafe; HTTP 409."""


def unknown_key_error(kind: str, key: object, known: list[str], fix: str = "") -> ValueError:
    """The one error for a key that is not registered: the key, the closest match, every key."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.0)
    hint = f"; the closest is {close[0]!r}" if close else ""
    fix = f" {fix}" if fix else ""
    return ValueError(f"unknown {kind} {key!r}{hint}. Registered: {', '.join(sorted(known)) or '(none)'}.{fix}")
