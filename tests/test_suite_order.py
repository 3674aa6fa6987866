"""tests/suite_order.py: the queue's order (longest file first, files kept whole) and the durations it reads."""

from types import SimpleNamespace

import suite_order


def items(*nodeids):
    return [SimpleNamespace(nodeid=n) for n in nodeids]


def test_longest_files_go_first_and_each_file_stays_whole_in_its_order():
    collected = items("tests/test_a.py::x", "tests/test_b.py::x", "tests/test_a.py::y", "notebooks/04.ipynb::Cell 0",
                      "tests/test_new.py::x", "notebooks/04.ipynb::Cell 1", "tests/test_c.py::x")
    durations = {"tests/test_a.py": 5.0, "tests/test_b.py": 50.0, "notebooks/04.ipynb": 20.0, "tests/test_c.py": 5.0}
    order = [i.nodeid for i in suite_order.longest_first(collected, durations)]
    assert order == ["tests/test_b.py::x", "notebooks/04.ipynb::Cell 0", "notebooks/04.ipynb::Cell 1",
                     "tests/test_a.py::x", "tests/test_a.py::y", "tests/test_c.py::x", "tests/test_new.py::x"]
    assert [i.nodeid for i in suite_order.longest_first(collected, {})][:3] == \
        ["tests/test_a.py::x", "tests/test_a.py::y", "tests/test_b.py::x"]          # no record: files as collected


def test_durations_are_summed_per_file_from_a_junit_report(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuites><testsuite name="pytest">'
                      '<testcase classname="tests.test_a" name="t1" time="1.5"/>'
                      '<testcase classname="tests.test_a" name="t2[x]" time="2.0"/>'
                      '<testcase classname="notebooks.04_training_ddpm.ipynb" name="Cell 3" time="4.0"/>'
                      '<testcase classname="tests.test_b" name="t" time="0.25"><skipped/></testcase>'
                      '</testsuite></testsuites>')
    assert suite_order.durations_from_junit(report) == {"tests/test_a.py": 3.5, "notebooks/04_training_ddpm.ipynb": 4.0,
                                                       "tests/test_b.py": 0.25}


def test_the_record_is_read_and_a_damaged_one_is_ignored(tmp_path):
    assert suite_order.load_durations(tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert suite_order.load_durations(tmp_path / "bad.json") == {}
    shipped = suite_order.load_durations()
    assert shipped and all(v >= 0 for v in shipped.values())
    assert "tests/test_browser.py" in shipped                          # the longest file must be in the record
