"""scripts/bench_tiny_sd3.py and its record, results/tiny_sd3.json (the tiny SD against a tiny SD 3).

The record comes from a run of about an hour on one CPU thread (two trainings and 12 evaluations of 398 images),
too long for the suite; these tests check the script's pieces and that the stored record is what the script
writes and what notebook 13 and the README read: both objectives at every step count, equal training steps, and
training settings that differ only where the objective does.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from course_lib.train import TrainConfig, lr_at

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "results" / "tiny_sd3.json"
ALLOWED = {"objective", "timestep_sampling", "steps", "zero_terminal_snr"}   # what the objective changes, or the plan


def load_script():
    spec = importlib.util.spec_from_file_location("bench_tiny_sd3", ROOT / "scripts" / "bench_tiny_sd3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_differences_names_every_differing_field_and_nothing_else():
    bench = load_script()
    base = {"preset": "sd_small", "train_config": {"steps": 100, "lr": 3e-4, "prediction": "epsilon"}}
    flow = {"preset": "sd_small", "train_config": {"steps": 100, "lr": 3e-4, "prediction": "epsilon",
                                                   "objective": "flow"}}
    assert bench.config_differences({"diffusion": base, "flow": flow}) == {"objective": [None, "flow"]}
    flow["train_config"]["lr"] = 1e-3
    flow["preset"] = "tiny"
    assert bench.config_differences({"diffusion": base, "flow": flow}) == {
        "objective": [None, "flow"], "lr": [3e-4, 1e-3], "preset": ["sd_small", "tiny"]}


def test_the_record_covers_both_objectives_at_every_step_count_with_equal_training():
    record = json.loads(RECORD.read_text())
    rows = {(r["objective"], r["steps"]): r for r in record["rows"]}
    assert set(rows) == {(o, k) for o in ("diffusion", "flow") for k in (1, 2, 4, 8, 16, 32)}
    assert {r["sampler"] for r in record["rows"] if r["objective"] == "flow"} == {"euler"}
    assert {r["sampler"] for r in record["rows"] if r["objective"] == "diffusion"} == {"ddim"}
    runs = record["training"]
    assert runs["diffusion"]["steps"] == runs["flow"]["steps"] > 0
    assert runs["flow"]["train_config"]["objective"] == "flow"
    assert set(record["config_differences"]) <= ALLOWED, record["config_differences"]
    configs = [TrainConfig(**{k: v for k, v in runs[o]["train_config"].items() if k in TrainConfig.__dataclass_fields__})
               for o in ("diffusion", "flow")]
    assert all(lr_at(s, configs[0]) == lr_at(s, configs[1]) for s in range(runs["flow"]["steps"]))
    for r in record["rows"]:
        assert record["floor"]["fid"] < r["fid"] and 0 <= r["judge_top1"] <= r["judge_top5"] <= 1
    assert record["n"] == 398 and 0 < record["real"]["judge_top1"] <= 1


def test_the_stored_table_is_the_scripts_table_of_the_record_and_the_readme_quotes_it():
    bench = load_script()
    record = json.loads(RECORD.read_text())
    assert record["table"] == bench.table(record)
    readme = (ROOT / "docs" / "results.md").read_text()
    section = readme[readme.index("### A tiny SD 3"):]
    section = section[:section.index("\n## ", 1) if "\n## " in section else None]
    for r in record["rows"]:
        assert re.search(rf"\|\s*{r['steps']}\s*\|", section)
        assert f"{r['fid']:.1f}" in section and f"{r['judge_top1']:.3f}" in section
