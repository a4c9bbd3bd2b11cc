"""Model classes the server imports by name, for the ``checkpoint`` kind.

A checkpoint is a bare state dict, so the server needs the class to build the module first:
``model_class="kitmodels:TinyNet"``. This package lives in ``tests/`` and is found through the
``PYTHONPATH`` that `kit.ServerProcess` gives the server, as a user's own package would be.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyNet"]


class TinyNet(nn.Module):
    """Four features in, two out: small enough to check outputs by hand.

    Constructed without arguments, as the ``checkpoint`` kind requires.
    """

    IN_FEATURES = 4
    OUT_FEATURES = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(self.IN_FEATURES, self.OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map float32 ``(N, 4)`` to ``(N, 2)``."""
        out: torch.Tensor = self.linear(x)
        return out
