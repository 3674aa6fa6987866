"""course_lib.judges: the shipped style and skin-tone judges on real held-out images, their failure case, and their
refusals; scripts/train_judges.py's code path in quick mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from course_lib import judges
from course_lib.data import load_emoji
from scriptrun import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from train_judges import BLUR_SIGMAS, blur, dataset, tone_of  # noqa: E402

# Measured fresh here. The tone judge meets its 90% goal; the style judge (goal 95%) ships at 92.5%, and its card
# says so: the bound is what it must not fall below.
STYLE_BOUND, TONE_BOUND = 0.92, 0.90


def test_style_judge_tells_noto_from_twemoji_on_held_out_emoji():
    x, y = dataset("style", "heldout")
    assert len(x) > 700 and {*y} == {"noto", "twemoji"}            # new base emoji, both styles
    acc = judges.accuracy("style", x, y, device="cpu")
    assert acc >= STYLE_BOUND
    net = judges.load_judge("style", device="cpu")
    assert acc == pytest.approx(net.info["heldout_accuracy"], abs=1e-9)   # the card's figure is what ships
    # its failure case: blur past anything it trained on costs it accuracy (the card states how much)
    assert judges.accuracy("style", blur(x, BLUR_SIGMAS[-1]), y, device="cpu") < acc


def test_tone_judge_names_the_six_tones_of_held_out_emoji():
    x, y = dataset("tone", "heldout")
    assert set(y) == set(judges.TONES) and len(x) >= 29 * 6
    acc = judges.accuracy("tone", x, y, device="cpu")
    assert acc >= TONE_BOUND
    pred = judges.predict("tone", x, device="cpu")
    for tone in judges.TONES:                                          # no tone is left to chance
        hits = [p == t for p, t in zip(pred, y) if t == tone]
        assert sum(hits) / len(hits) > 0.5, tone
    assert judges.accuracy("tone", blur(x, BLUR_SIGMAS[-1]), y, device="cpu") < acc


def test_tone_labels_come_from_the_captions():
    caps = {"waving hand", "waving hand: light skin tone", "red heart"}
    assert tone_of("waving hand: dark skin tone", caps) == "dark"
    assert tone_of("waving hand: medium-light skin tone", caps) == "medium-light"
    assert tone_of("waving hand", caps) == ""                           # the default yellow of a toned emoji
    assert tone_of("red heart", caps) is None                           # no tones at all
    assert tone_of("people holding hands: light skin tone, dark skin tone", caps) is None   # two tones


def test_judges_refuse_what_they_cannot_judge(tmp_path):
    images = load_emoji(32, "heldout", limit=4).images
    with pytest.raises(ValueError, match=r"unknown judge 'colour'; choose from \['style', 'tone'\]"):
        judges.predict("colour", images)
    with pytest.raises(ValueError, match=r"unknown tone class 'green'; choose from"):
        judges.accuracy("tone", images, ["green"] * 4)
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\)"):
        judges.predict("style", images[0])
    with pytest.raises(ValueError, match="one true class per image"):
        judges.accuracy("style", images, ["noto"])
    with pytest.raises(FileNotFoundError, match="scripts/train_judges.py"):
        judges.load_judge("style", path=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is not a tone judge"):
        judges.load_judge("tone", path=judges.judge_path("style"))


def test_quick_run_trains_both_judges_and_writes_their_card(tmp_path):
    run = run_script("train_judges.py", "--quick", "--out-dir", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in judges.JUDGES:
        net = judges.load_judge(name, device="cpu", path=tmp_path / f"{name}_judge.safetensors")
        assert net.info["steps"] >= 1 and net.info["classes"] == list(judges.JUDGES[name])
        shipped = judges.load_judge(name, device="cpu")
        assert any(not a.equal(b) for a, b in zip(net.state_dict().values(), shipped.state_dict().values()))
    card = (tmp_path / "judges.md").read_text()
    assert "## style judge" in card and "## tone judge" in card and "through the VAE" in card
    assert "judged Noto" in card and "## Goals" in card
    bad = run_script("train_judges.py", "--epochs", "0")
    assert bad.returncode != 0 and "--epochs and --batch-size must be at least 1" in bad.stderr


def test_judges_refuse_nan_and_0_255_images():
    from course_lib import judges
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"values in \[-1, 1\].*127.5"):
        judges.predict("style", x + 200)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN .*image\(s\) 1"):
        judges.probabilities("tone", x)
