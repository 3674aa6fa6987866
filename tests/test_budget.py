"""course_lib.budget: the planner's closed forms against the networks' own counts, and its sums against steps
accounted whole (results/memory_sd15_accounted_t4.json)."""

import json
from pathlib import Path

import pytest
import torch

from course_lib import budget, lora, memory
from course_lib.sd import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]


def test_counts_are_the_networks_own():
    model = StableDiffusion.random("tiny")
    counts = budget.counts("tiny")
    assert {k: counts[k] for k in ("unet", "vae", "text_encoder")} == model.parameter_counts()
    lora.inject_lora(model.unet, rank=3)
    assert lora.adapter_numbers(model.unet) == 3 * counts["lora_per_rank"]
    linear = sum(m.weight.numel() for m in model.unet.modules()
                 if isinstance(m, torch.nn.Linear) and m.in_features >= 64)
    assert counts["unet_linear"] == linear


def test_closed_forms():
    n = budget.counts()
    assert budget.weights_bytes("fp16") == 2 * (n["unet"] + n["vae"] + n["text_encoder"])
    assert budget.weights_bytes("fp32") == 2 * budget.weights_bytes("fp16")
    assert budget.weights_bytes("nf4") < budget.weights_bytes("fp16") - 1.4 * n["unet_linear"]
    assert 0.5 < budget.nf4_bytes() < 0.52                        # 4 bits + the double-quantised block scales
    assert budget.adapter_bytes(4) == 4 * n["lora_per_rank"] * 16     # float32 weight, gradient, two moments
    assert sum(r * (i + o) for r in (1,) for i, o in n["lora_shapes"]) == n["lora_per_rank"]
    big = sum(4 * d for shape in n["lora_shapes"] for d in shape if 4 * d >= 4096)   # tensors 8-bit AdamW quantises
    assert 0 < big < 4 * n["lora_per_rank"]
    assert budget.adapter_bytes(4, "8-bit AdamW") == pytest.approx(budget.adapter_bytes(4) - big * (8 - 2 - 8 / 2048))
    assert budget.adapter_bytes(1, "8-bit AdamW") == budget.adapter_bytes(1)          # rank 1: every tensor is small


def test_the_live_accounting_runs_the_same_function_on_the_tiny_preset():
    parts = budget.account_activations(64, False, "flash", preset="tiny")     # no checkpointing: half the time
    assert parts["activations"] > 0 and parts["weights"] > 0
    assert parts["peak"] == sum(parts[k] for k in ("weights", "gradients", "optimizer state", "activations",
                                                   "workspaces"))
    assert parts["workspaces"] == memory.GPUS["T4"].workspace_bytes


def test_the_planner_agrees_with_steps_accounted_whole():
    """The sum of the parts against the LoRA rows of the accounted table (the same GPU, T4): within 5%. The QLoRA
    row is the planner's closed form for NF4 weights against a step accounted on NF4Linear layers."""
    rows = {r["name"]: r["peak_gib"] for r in
            json.loads((ROOT / "results" / "memory_sd15_accounted_t4.json").read_text())["rows"]}
    pairs = [(budget.plan(512, 1), rows["LoRA step, 512 px, batch 1, rank 4, gradient checkpointing"]),
             (budget.plan(512, 1, checkpointing=False), rows["LoRA step, 512 px, batch 1, rank 4, no checkpointing"]),
             (budget.plan(512, 2), next(v for k, v in rows.items() if k.startswith("LoRA-DreamBooth"))),
             (budget.plan(512, 1, weights="nf4"), next(v for k, v in rows.items() if k.startswith("QLoRA step")))]
    for plan, whole in pairs:
        assert abs(plan.total_gib / whole - 1) <= 0.05, (plan.total_gib, whole)


def test_the_planner_moves_the_way_the_techniques_say():
    base = budget.plan(512, 1).total_gib
    assert budget.plan(512, 1, weights="nf4").total_gib < base - 0.3     # NF4 holds the linear layers only
    assert budget.plan(512, 1, checkpointing=False).total_gib > base
    assert budget.plan(512, 1, attention="math").total_gib > budget.plan(512, 1, attention="math, sliced").total_gib
    assert budget.plan(768, 4).total_gib > budget.plan(768, 2).total_gib > budget.plan(768, 1).total_gib
    assert "fits" in str(budget.plan(512, 1)) and budget.plan(512, 1).fits


def test_bad_choices_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown size 300; choose from \[256, 512, 768\]"):
        budget.plan(300)
    with pytest.raises(ValueError, match="unknown weights 'int8'"):
        budget.plan(weights="int8")
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        budget.plan(batch=0)
    with pytest.raises(ValueError, match="LoRA rank must be an int >= 1"):
        budget.plan(rank=0)


def test_the_widget_figure_draws_the_budget_line():
    from course_lib.widgets import budget_figure
    fig = budget_figure(512, 1, "fp16", True, "flash", 4, "AdamW")
    assert "fits" in fig.axes[0].get_title()
