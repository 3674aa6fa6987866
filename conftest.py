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
