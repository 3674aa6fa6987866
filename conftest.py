"""Pytest set-up for the whole repository: the suite runs in quick mode.

Set here, before any test or notebook kernel starts, so unit tests and the notebooks
that nbval runs (in kernels that inherit this environment) all see quick mode.
Run `COURSE_QUICK=0 pytest notebooks` to check the notebooks in full mode instead.
"""

import os

os.environ.setdefault("COURSE_QUICK", "1")
