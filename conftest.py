"""Pytest set-up for the whole repository: the suite runs in quick mode.

Set here, before any test or notebook kernel starts, so unit tests and the notebooks
that nbval runs (in kernels that inherit this environment) all see quick mode.
Run `COURSE_QUICK=0 pytest notebooks` to check the notebooks in full mode instead.
"""

import os

os.environ.setdefault("COURSE_QUICK", "1")

# Under pytest-xdist (`make test`: one worker per core) every worker, and every notebook kernel it starts (kernels
# inherit this environment), uses one thread: two workers on two cores, not four threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


# Each notebook that tests/test_browser_a.py and _b.py drive runs there, every cell, in quick mode, checked for errors,
# and its NBVAL_CHECK_OUTPUT cells compared with the committed outputs as nbval compares them. Where those tests are
# collected and selected (Chromium found; otherwise the modules skip themselves), nbval does not run such a notebook a
# second time: one quick run of each, not two, keeps `make test` inside its time. `pytest notebooks/X.ipynb` alone runs nbval.
import pytest  # noqa: E402

BROWSER_TESTS = ("tests/test_browser_a.py", "tests/test_browser_b.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    driven = {item.callspec.params["notebook"] for item in items
              if item.nodeid.startswith(BROWSER_TESTS) and hasattr(item, "callspec")}
    if not driven:
        return
    kept = [item for item in items if not (item.nodeid.startswith("notebooks/")
                                           and item.nodeid.split("::")[0].removeprefix("notebooks/") in driven)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
