"""Errors of torch summaries (in their own module so the readers and writers share them)."""

from __future__ import annotations

import pickle


class SummaryMismatchError(ValueError):
    """A summary file or dict is not a valid summary, or does not fit the model; the message
    names the file (or parameter) and the problem, and the model was left unchanged."""


class UnsafeFileError(SummaryMismatchError, pickle.UnpicklingError):
    """The file names a Python global a summary never needs (it may try to run code); it was
    refused before anything in it ran."""
