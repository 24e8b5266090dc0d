"""Typed errors of the training side; the CLI turns each into a one-line message."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Base class of every error the training commands report to the user."""


class DataError(TrainingError):
    """A data folder that is missing, empty, holds no images or holds an unreadable image."""


class ExportError(TrainingError):
    """An exported model that fails the ONNX checker or differs from PyTorch beyond tolerance."""


class ConfigError(TrainingError):
    """An option with a value that cannot work; the message names the option and the value."""
