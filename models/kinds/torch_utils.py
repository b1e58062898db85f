"""Running the eager reference module on numpy inputs (export only: imports torch)."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def run_torch(wrapper: torch.nn.Module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    outs = wrapper(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
    return [o.numpy() for o in (outs if isinstance(outs, tuple) else (outs,))]
