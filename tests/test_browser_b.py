"""The widgets of notebooks 06, 08, 09, 15, 17 and 19 in a real browser: one of two halves
(tests/browser_harness.py says how, and why two)."""

import pytest

from browser_harness import browser, cases, lab, require_browser, run_case  # noqa: F401  (lab, browser: fixtures)

require_browser()
CASES = cases("b")


@pytest.mark.parametrize("notebook,slider,presses", CASES, ids=[c[0][:2] for c in CASES])
def test_widget_moves_the_picture(lab, browser, notebook, slider, presses):  # noqa: F811  (the fixtures)
    run_case(lab, browser, notebook, slider, presses)
