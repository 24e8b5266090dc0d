"""Client library of the anomaly-detection service (``Client``) and its CLI (``python -m
service.client``)."""

from __future__ import annotations

from service.client.client import Client, ImageInput, Result

__all__ = ["Client", "ImageInput", "Result"]
