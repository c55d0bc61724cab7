"""Choosing the torch device. Called inside worker processes only, after fork."""

from __future__ import annotations

import torch

from radq.errors import ConfigurationError


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device that exists here.

    Raises:
        ConfigurationError: CUDA was asked for and is not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(f"RADQ_DEVICE={spec} but CUDA is not available on this host")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"RADQ_DEVICE={spec} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    return torch.device("cpu")
