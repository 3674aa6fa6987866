r"""Checks shared by every module: one voice for the errors a learner reads.

    number(t)       t.item(), or NaN for a tensor without values (a logged loss of a fake run)
    has_values(t)   False for a tensor that has a shape and a dtype but no data (a fake tensor of
                    torch._subclasses.FakeTensorMode, as course_lib.memory's accounting runs the course's code
                    on, or a tensor on the "meta" device): checks that read values skip those, checks of
                    shapes and dtypes still run.
    check_choice    an option that must be one of a few names: "unknown <what> <value>; choose from [...]"
    check_int       an integer in a range (bool and floats refused): "<name> must be an int ...; got <value>"
"""

from __future__ import annotations

import math
import numbers

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


def check_choice(name: str, value: str, valid: tuple[str, ...] | list[str]) -> str:
    """value if it is one of `valid`; else a ValueError naming the option, the value given and every valid choice:
    check_choice("split", "test", SPLITS) raises ValueError("unknown split 'test'; choose from ['train', ...]")."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose from {list(valid)}")
    return value


def check_int(name: str, value, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """value as an int if it is an integer in [low, high] (either bound may be None); else a ValueError that names
    it, the range and what was given (bool and floats are refused: 3.0 is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (low is not None and value < low) or (high is not None and value > high):
        span = (f" from {low} to {high}" if low is not None and high is not None else
                f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be an int{span}{hint}; got {value!r}")
    return int(value)
