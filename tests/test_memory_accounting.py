"""course_lib.memory.accounting: GPU memory accounted on fake tensors, on any machine.

Checked against closed forms (weights, gradients and AdamW's moments are known to the byte), against the H100's
measured rows of results/memory_full_mode_h100.json (live for one row, and the stored record of all six, which
scripts/measure_memory.py --account H100 writes), and for what it models: CUDA autocast's casting rules, the two
attention kernels, a layer far larger than this machine's memory."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from course_lib import memory
from course_lib.checks import has_values
from course_lib.loop import GPU_STAND_IN

ROOT = Path(__file__).resolve().parents[1]
BAND = 0.15      # the target: every accounted row within 15% of the GPU's measurement


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_weights_gradients_and_adam_moments_are_counted_to_the_byte():
    with memory.accounting("H100"):
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
        x = torch.randn(64, 100)

        def step():
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        report = memory.measure_peak(lambda: (step(), step()), what="two AdamW steps")
    W = nbytes(model)
    c = report.categories
    assert c["weights"] == W and c["gradients"] == W
    # the two moments (2 W) and the step's temporaries, at most two of the largest tensor's size
    largest = max(p.numel() * 4 for p in model.parameters())
    assert 2 * W <= c["optimizer state"] <= 2 * W + 2 * largest + 4 * len(list(model.parameters()))
    assert c["workspaces"] == memory.GPUS["H100"].workspace_bytes
    assert report.peak_bytes == sum(c.values()) and report.accounted and report.fits


def test_a_layer_larger_than_this_machine_is_accounted_without_allocating_it():
    with memory.accounting("T4"):
        layer = nn.Linear(60_000, 60_000)                # 14.4 GB of float32 weights
        assert not has_values(layer.weight)
        report = memory.measure_peak(lambda: layer(torch.randn(4, 60_000)), what="one huge layer")
    assert report.categories["weights"] == 60_000 * 60_001 * 4
    assert not report.fits and "OVER" in str(report) and "accounted" in str(report)
    assert has_values(nn.Linear(2, 2).weight)           # outside, weights are real again


def test_everything_patched_is_restored_even_after_an_error():
    make, apply = nn.Parameter.__new__, nn.Module._apply
    with pytest.raises(RuntimeError, match="inside"):
        with memory.accounting():
            assert GPU_STAND_IN
            raise RuntimeError("inside")
    assert (nn.Parameter.__new__, nn.Module._apply) == (make, apply) and not GPU_STAND_IN


def test_bad_names_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"choose from \['H100', 'T4'\]"):
        with memory.accounting("A100"):
            pass
    with pytest.raises(ValueError, match=r"choose from \['flash', 'math'\]"):
        with memory.accounting("H100", attention="xformers"):
            pass


def test_modules_of_fakes_convert_like_real_ones():
    with memory.accounting():
        model = mlp().half().to("cpu")
        assert model[0].weight.dtype == torch.float16 and isinstance(model[0].weight, nn.Parameter)


def test_mixed_precision_follows_cuda_autocast_rules_not_the_cpus():
    from course_lib.loop import autocast
    with memory.accounting():
        conv, norm = nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8)
        with autocast("bf16", "cpu"):
            y = conv(torch.randn(2, 4, 8, 8))
            z = norm(y)
            w = torch.softmax(y, dim=1)
    assert y.dtype == torch.bfloat16                    # convolutions: low precision
    assert z.dtype == torch.float32 and w.dtype == torch.float32   # norms and softmax: float32 (CUDA's lists)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the CPU's own autocast keeps GroupNorm in bf16
        assert nn.GroupNorm(2, 8)(torch.randn(2, 8, 4, 4).bfloat16()).dtype == torch.bfloat16


def test_the_math_attention_kernel_holds_the_score_matrix_and_flash_does_not():
    B, heads, L, d = 2, 4, 1024, 32
    peaks = {}
    for kernel in ("flash", "math"):
        with memory.accounting("H100", attention=kernel):
            q = nn.Parameter(torch.randn(B, heads, L, d))
            report = memory.measure_peak(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward(), what=kernel)
        peaks[kernel] = report.peak_bytes
    scores = B * heads * L * L * 4
    assert peaks["math"] - peaks["flash"] >= scores


def h100_rows() -> dict[str, float]:
    record = json.loads((ROOT / "results" / "memory_full_mode_h100.json").read_text())
    return {r["name"]: r["peak_gib"] for r in record["rows"]}


def test_the_latent_training_step_is_accounted_within_the_band_of_the_h100():
    """Notebook 07's row, live: the H100 ran it under bf16 autocast (precision "auto" there)."""
    from course_lib.train import TrainConfig, Trainer
    from course_lib.unet import UNet, get_preset
    with memory.accounting("H100"):
        model = UNet(get_preset("small", image_size=8, in_channels=4, out_channels=4))
        latents = torch.randn(256, 4, 8, 8)
        config = TrainConfig(steps=2, batch_size=64, warmup=1, latents=True, precision="bf16")
        report = memory.measure_peak(lambda: Trainer(model, latents, config, device="cpu").train(progress=False),
                                     what="07")
    measured = h100_rows()["07 latent training step"]
    assert abs(report.peak_gib / measured - 1) <= BAND, (report.peak_gib, measured)


def test_the_stored_accounting_matches_every_h100_row_within_the_band():
    """results/memory_accounted_h100.json, from `python scripts/measure_memory.py --account H100 --only
    04,06,07,08,09 --json results/memory_accounted_h100.json`: the H100's rows were measured with precision
    "auto" (bf16 there), so each is compared with its bf16 accounted row."""
    accounted = json.loads((ROOT / "results" / "memory_accounted_h100.json").read_text())
    assert accounted["accounted"] == "H100" and not accounted["failed"]
    rows = {r["name"]: r for r in accounted["rows"]}
    compared = 0
    for name, measured in h100_rows().items():
        row = rows.get(f"{name}, bf16") or rows[name]
        assert row["precision"] in ("bf16", ""), name
        assert abs(row["peak_gib"] / measured - 1) <= BAND, (name, row["peak_gib"], measured)
        compared += 1
    assert compared == 6


def test_8bit_adamw_holds_a_quarter_of_adamws_state_where_many_tensors_train():
    """Its float32 work is one tensor at a time, so across 16 layers the state's 2 bytes a weight dominate."""
    from course_lib.quantize import AdamW8bit
    states = {}
    for name in ("AdamW", "8-bit AdamW"):
        with memory.accounting("H100"):
            layers = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(16)])
            opt = (AdamW8bit(layers.parameters()) if name == "8-bit AdamW"
                   else torch.optim.AdamW(layers.parameters(), foreach=False))
            x = torch.randn(8, 256)

            def step():
                layers(x).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            states[name] = memory.measure_peak(lambda: (step(), step()), what=name).categories["optimizer state"]
    n = 16 * 256 * 256
    assert states["AdamW"] >= 8 * n
    assert 2 * n <= states["8-bit AdamW"] < states["AdamW"] / 2
