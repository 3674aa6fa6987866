"""course_lib.checks: the shared checks' helpers."""

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from course_lib.checks import has_values, number


def test_real_tensors_have_values_fake_and_meta_ones_do_not():
    assert has_values(torch.zeros(2))
    assert not has_values(torch.zeros(2, device="meta"))
    with FakeTensorMode() as mode:
        fake = torch.zeros(2)
        assert not has_values(fake)
        assert not has_values(torch.zeros(2))      # made inside the mode: fake too
    assert not has_values(mode.from_tensor(torch.ones(1)))


def test_number_reads_a_real_value_and_gives_nan_for_a_fake():
    assert number(torch.tensor(2.5)) == 2.5
    with FakeTensorMode():
        assert math.isnan(number(torch.tensor(2.5).sum()))
