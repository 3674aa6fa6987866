r"""Checks shared by every module: one voice for the errors a learner reads.

    number(t)       t.item(), or NaN for a tensor without values (a logged loss of a fake run)
    has_values(t)   False for a tensor that has a shape and a dtype but no data (a fake tensor of
                    torch._subclasses.FakeTensorMode, as course_lib.memory's accounting runs the course's code
                    on, or a tensor on the "meta" device): checks that read values skip those, checks of
                    shapes and dtypes still run.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


def has_values(t: torch.Tensor) -> bool:
    """Whether t holds data that a check may read: not a fake or meta tensor, and no FakeTensorMode active (inside
    one, even a real tensor's isfinite() comes back fake)."""
    if t.device.type == "meta" or is_fake(t):
        return False
    return not any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def number(t: torch.Tensor) -> float:
    """t.item() for logging, or NaN where t has no values (see has_values)."""
    return t.item() if has_values(t) else math.nan
