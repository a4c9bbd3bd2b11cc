"""A model class whose construction asks the allocator for far more memory than any machine has.

Its checkpoint file is tiny, so the size estimated before loading fits, and the load really
fails where a too-large model fails: in the allocator (``model_class="kitmodels.hungry:Hungry"``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Hungry"]

HUNGRY_BYTES = 2**47
"""128 TiB: more than the memory and swap of any machine the tests run on."""


class Hungry(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(HUNGRY_BYTES // 4))
