"""Shared set-up for the unit tests: quick mode and a headless matplotlib backend."""

import os

import matplotlib

# The whole suite runs in quick mode (tiny sizes), unless the caller already chose a mode.
os.environ.setdefault("COURSE_QUICK", "1")
# No display in CI: draw figures into memory only.
matplotlib.use("Agg")
