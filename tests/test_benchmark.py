"""course_lib.benchmark: notebook 12's comparison of personalisation methods (its full run over every method is
tests/test_hyperdreambooth.py::test_compare_personalisation_runs_every_method)."""

import pytest

from course_lib import benchmark


def test_summarise_averages_each_measure_over_subjects_and_skips_empty_methods():
    records = {"LiDB": [dict(seconds=1.0, subject=0.5, tone=0.0), dict(seconds=3.0, subject=0.7, tone=1.0)],
               "DreamBooth": []}
    summary = benchmark.summarise(records)
    assert set(summary) == {"LiDB"}
    assert summary["LiDB"] == pytest.approx(dict(seconds=2.0, subject=0.6, tone=0.5))


def test_the_six_methods_in_the_order_of_notebook_12():
    assert benchmark.PERSONALISATION_METHODS == ("DreamBooth", "LoRA-DreamBooth", "LiDB", "hypernetwork only",
                                                 "hypernetwork + fast fine-tuning", "textual inversion")


def test_file_bytes_is_the_float16_safetensors_file_two_bytes_a_number_plus_a_small_header():
    import torch
    from safetensors.torch import save
    x = torch.randn(3, 256, dtype=torch.float64)
    size = benchmark.file_bytes({"x": x})
    assert size == len(save({"x": x.half()}))
    assert 0 < size - 2 * x.numel() < 256

def test_a_record_says_whether_it_was_made_with_the_shipped_models():
    ids = benchmark.shipped_identity()
    assert set(ids) == {"tiny_sd_emoji", "vae_emoji32", "clip_emoji", "hyperdreambooth"}
    assert all(len(v) == 64 for v in ids.values())                      # SHA-256 in hex, from each file's metadata
    assert benchmark.record_is_current({"models": dict(ids)}) is True
    assert benchmark.record_is_current({"models": {**ids, "tiny_sd_emoji": "0" * 64}}) is False
    assert benchmark.record_is_current({}) is None                       # an older record does not say
