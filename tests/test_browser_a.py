"""The widgets of notebooks 01, 02, 05, 10 and 13 in a real browser: one of two halves (tests/browser_harness.py says
how, and why two)."""

import pytest

from browser_harness import browser, cases, lab, require_browser, run_case  # noqa: F401  (lab, browser: fixtures)

require_browser()
CASES = cases("a")


@pytest.mark.parametrize("notebook,slider,presses", CASES, ids=[c[0][:2] for c in CASES])
def test_widget_moves_the_picture(lab, browser, notebook, slider, presses):  # noqa: F811  (the fixtures)
    run_case(lab, browser, notebook, slider, presses)
