"""Quick mode is read from the COURSE_QUICK environment variable."""

import os

import pytest
import torch

from course_lib import settings


@pytest.mark.parametrize("value", ["1", "true", "TRUE", " yes ", "on"])
def test_quick_mode_on(monkeypatch, value):
    monkeypatch.setenv("COURSE_QUICK", value)
    assert settings.quick_mode() is True
    assert settings.choose(full=1000, quick=10) == 10
    assert settings.mode_name() == "quick"


@pytest.mark.parametrize("value", ["0", "", "false", "off"])
def test_quick_mode_off(monkeypatch, value):
    monkeypatch.setenv("COURSE_QUICK", value)
    assert settings.quick_mode() is False
    assert settings.choose(full=1000, quick=10) == 1000
    assert settings.mode_name() == "full"


def test_unset_means_full_mode(monkeypatch):
    monkeypatch.delenv("COURSE_QUICK", raising=False)
    assert settings.quick_mode() is False
    assert settings.choose(full="big", quick="small") == "big"


def test_unknown_value_raises_listing_valid_values(monkeypatch):
    monkeypatch.setenv("COURSE_QUICK", "maybe")
    with pytest.raises(ValueError) as info:
        settings.quick_mode()
    message = str(info.value)
    assert "maybe" in message
    for valid in ("1", "true", "0", "false"):
        assert repr(valid) in message
    with pytest.raises(ValueError, match="maybe"):
        settings.choose(full=1, quick=2)


def test_suite_sets_a_mode():
    # tests/conftest.py sets COURSE_QUICK=1 unless the caller chose a mode, and that value is valid.
    assert "COURSE_QUICK" in os.environ
    settings.quick_mode()  # raises on a value it does not understand


def test_default_device():
    assert settings.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_timed_returns_the_result_and_the_seconds():
    import time

    result, seconds = settings.timed(lambda: time.sleep(0.02) or "done")
    assert result == "done"
    assert 0.02 <= seconds < 1.0
    assert settings.timed(lambda: None)[1] >= 0


def test_timed_refuses_what_is_not_a_function():
    with pytest.raises(TypeError, match=r"function of no arguments .*got int"):
        settings.timed(3)


def test_describe_machine_on_the_cpu_names_the_model_and_threads():
    threads = torch.get_num_threads()
    assert settings.describe_machine("cpu") == f"{settings.cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"
    # the benchmarks' line (results/samplers_eps_vs_v_cpu.txt keeps this form)
    assert settings.describe_machine("cpu", detail=True) == (
        f"CPU {settings.cpu_name()}; torch {torch.__version__}; {threads} thread(s); "
        f"{os.cpu_count()} logical CPUs visible")
