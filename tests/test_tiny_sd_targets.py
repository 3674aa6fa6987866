"""scripts/tiny_sd_targets.py on a few captions: its record holds both floors and ratios that follow from them."""

import json
from pathlib import Path

from scriptrun import run_script

ROOT = Path(__file__).resolve().parent.parent


def test_targets_record_has_both_floors(tmp_path):
    out = tmp_path / "targets.json"
    run = run_script("tiny_sd_targets.py", "--n", "12", "--json", str(out))
    assert run.returncode == 0, run.stderr
    r = json.loads(out.read_text())
    assert r["n"] == 12 and r["fid"] > 0 and r["floor_fid"] > 0 and r["matched_floor_fid"] > 0
    assert abs(r["fid_over_floor"] - r["fid"] / r["floor_fid"]) < 1e-9
    assert abs(r["fid_over_matched_floor"] - r["fid"] / r["matched_floor_fid"]) < 1e-9
    assert "caption-matched floor" in run.stdout and "targets:" in run.stdout
