"""Pickled tensor files (``.pt``/``.pth``/``.bin``) read without ever running code from them.

``torch.load(weights_only=True)`` unpickles tensors and plain containers only; anything else
(a class, a function call: how a crafted pickle runs code) stops it with an UnpicklingError
whose text explains how to load the file unsafely. Ours says what happened instead.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from threetowers.errors import UserError


class UnsafeFileError(UserError, ValueError):
    """A file holds more than tensors and plain data, so it was not loaded."""


def refusal(path: str | Path, error: Exception) -> UnsafeFileError:
    """The error for a pickle that ``weights_only`` loading refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's message is mostly advice on loading unsafely; keep only what it found
    found = [line for line in lines if "WeightsUnpickler error" in line]
    detail = (found or lines or [type(error).__name__])[0].split(". ")[0][:200]
    return UnsafeFileError(
        f"{path} holds objects other than tensors and plain containers (a pickle that could "
        f"run code when loaded), so it was refused; use a file of weights only, ideally "
        f"safetensors ({detail})"
    )


def load_tensors(path: str | Path) -> Any:
    """``torch.load`` of tensors and plain containers only, on the CPU."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise refusal(path, error) from None
