"""The torch device of the torch stages: the shared ``device`` param (or ``ctdiff predict --device``)."""

from __future__ import annotations

import torch

from ctdiff.params import ParamsError


def pick_device(choice: str, index: int | None = None, key: str = "device") -> torch.device:
    """``auto`` = CUDA when visible, else CPU; ``cuda`` without a visible GPU is an error, not a silent CPU run.

    ``index``: the GPU of this process (``LOCAL_RANK`` under torchrun); None = the current one. ``key``
    names the param in the error.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"{key}=cuda but no CUDA device is visible (set {key}=auto or cpu)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device("cpu")
