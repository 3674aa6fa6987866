"""The order in which `make test` hands files to its workers: the longest first.

pytest-xdist (`--dist loadfile`) gives each worker one file at a time, in the order of a queue. A long file taken
last keeps one worker busy while the others have nothing left, so the queue starts with the longest files and ends
with the short ones that fill the gaps (longest-processing-time-first scheduling). How long each file takes is read
from tests/durations.json: seconds per file, summed from a run's JUnit report. A file missing from it (a new one)
counts as a short one. The order changes nothing but the wall time.

    python -m pytest -n 3 --dist loadfile --junitxml=/tmp/junit.xml   # a whole run, with its report
    python tests/suite_order.py /tmp/junit.xml                         # rewrite tests/durations.json from it
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")


def file_of(nodeid: str) -> str:
    """The file a test belongs to, as pytest names it: "tests/test_x.py::test_y[a]" -> "tests/test_x.py"."""
    return nodeid.split("::", 1)[0]


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Seconds per file from tests/durations.json; {} when it is missing or unreadable (the order is then pytest's)."""
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def longest_first(items: list, durations: dict[str, float]) -> list:
    """The items regrouped by file, the files in decreasing duration (unknown files last, in their collected order);
    within a file the collected order is kept, so module fixtures and a notebook's cells stay together."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(file_of(item.nodeid), []).append(item)
    order = sorted(files, key=lambda f: -durations.get(f, 0.0))        # sorted() is stable: ties keep their order
    return [item for f in order for item in files[f]]


def durations_from_junit(report: Path) -> dict[str, float]:
    """Seconds per file summed from a JUnit XML report (pytest --junitxml), its fixtures' time included."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("file")
        if not path:               # classname "tests.test_x" or, for a notebook, "notebooks.04_training_ddpm.ipynb"
            name = case.get("classname", "")
            stem, suffix = (name.removesuffix(".ipynb"), ".ipynb") if name.endswith(".ipynb") else (name, ".py")
            path = stem.replace(".", "/") + suffix
        seconds[path] += float(case.get("time", 0.0))
    return dict(seconds)


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        sys.exit("usage: python tests/suite_order.py REPORT.xml   (a JUnit report: pytest --junitxml=REPORT.xml)")
    seconds = durations_from_junit(Path(argv[0]))
    record = {"what": "seconds per test file in one run of the suite, for the order of the queue (tests/suite_order.py)",
              "command": "python -m pytest -n 2 --dist loadfile --junitxml=REPORT.xml; python tests/suite_order.py "
                         "REPORT.xml",
              "seconds": {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}
    tmp = DURATIONS.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(DURATIONS)
    print(f"{DURATIONS}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all; longest: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in list(record["seconds"].items())[:5]))


if __name__ == "__main__":
    main(sys.argv[1:])
