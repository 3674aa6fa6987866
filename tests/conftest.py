"""Shared set-up for the unit tests: a headless matplotlib backend.

Quick mode is set for the whole suite by the repository's root conftest.py.
"""

import matplotlib

# No display in CI: draw figures into memory only.
matplotlib.use("Agg")
