"""course_lib.memory: peak GPU memory is measured on a GPU and honestly not measured on a CPU."""

import pytest
import torch
import torch.nn as nn

from course_lib import memory
from course_lib.memory import MemoryReport, measure_peak, resolve_precision, sampling_memory, training_step_memory

CUDA = torch.cuda.is_available()


class TinyDenoiser(nn.Module):
    """The contract's call signature model(x_t, t), in a few hundred parameters."""

    def __init__(self, channels: int = 3, hidden: int = 8):
        super().__init__()
        self.gradient_checkpointing = False
        self.time = nn.Linear(1, hidden)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        emb = self.time(t.float()[:, None] / 1000)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x) + emb))


def test_cpu_report_says_not_measured():
    report = MemoryReport("training step", None)
    assert not report.measured and report.fits is None and report.peak_gib is None
    assert "no CUDA GPU here: peak GPU memory not measured" in str(report)


def test_measure_peak_runs_the_function_on_cpu():
    calls = []
    report = measure_peak(lambda: calls.append(1), device="cpu", what="demo")
    assert calls == [1]
    assert report.peak_bytes is None and "not measured" in str(report) and str(report).startswith("demo")


def test_gpu_report_reads_clearly():
    report = MemoryReport("sampling", int(1.5 * memory.GIB), int(2 * memory.GIB), "Some GPU", precision="bf16")
    assert report.fits and "1.50 GiB" in str(report) and "within the 8 GiB budget" in str(report)
    assert not MemoryReport("big", 9 * memory.GIB, 9 * memory.GIB, "Some GPU").fits


def test_precision_choice():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"choose from \['auto', 'fp32', 'bf16', 'fp16'\]"):
        resolve_precision("half", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_training_step_runs_on_cpu_and_restores_the_model(prediction):
    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = training_step_memory(model, (4, 3, 8, 8), prediction=prediction, gradient_checkpointing=True)
    assert model.calls == 1 and "not measured" in str(report) and "gradient checkpointing" in report.what
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and model.gradient_checkpointing is False


def test_training_step_checks_its_inputs():
    with pytest.raises(ValueError, match=r"unknown prediction type 'score'; choose from"):
        training_step_memory(TinyDenoiser(), (2, 3, 8, 8), prediction="score")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        training_step_memory(TinyDenoiser(), (3, 8, 8))
    with pytest.raises(ValueError, match="no gradient checkpointing switch"):
        training_step_memory(nn.Conv2d(3, 3, 1), (2, 3, 8, 8), gradient_checkpointing=True)


def test_sampling_calls_the_model_once_per_step():
    model = TinyDenoiser()
    report = sampling_memory(model, (2, 3, 8, 8), steps=5, precision="bf16")
    assert model.calls == 5 and report.precision == "bf16" and "5 steps" in report.what
    assert model.training  # mode restored


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_measures_a_real_peak():
    device = torch.device("cuda")
    mib = 2 ** 20
    report = measure_peak(lambda: torch.empty(256 * mib, dtype=torch.uint8, device=device), device)
    assert report.measured and report.peak_bytes >= 256 * mib and report.fits
    model = TinyDenoiser().to(device)
    train = training_step_memory(model, (8, 3, 32, 32))
    assert train.precision == ("bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16")
    assert train.measured and 0 < train.peak_bytes < memory.GIB and train.fits
    for precision in ("fp32", "fp16"):  # the GradScaler path too
        assert training_step_memory(model, (8, 3, 32, 32), precision=precision).measured
    assert sampling_memory(model, (8, 3, 32, 32), steps=3).measured


def test_training_step_is_one_step_of_the_trainer(monkeypatch):
    """The measured work is course_lib.train.Trainer.train_step (the one loop around the one objective),
    not a copy of it: for a plain denoiser and for a text-conditioned U-Net with LoRA, as notebooks 10-12 use it."""
    from course_lib import lora
    from course_lib.train import Trainer
    from course_lib.unet import UNet, get_preset
    steps = []
    original = Trainer.train_step

    def spy(self):
        steps.append((type(self).__name__, self.images.shape, self.conditioning is not None))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", spy)
    training_step_memory(TinyDenoiser(), (2, 3, 8, 8), precision="fp32")
    torch.manual_seed(0)
    unet = UNet(get_preset("sd_tiny", image_size=8, in_channels=4, out_channels=4, context_dim=16)).eval()
    lora.inject_lora(unet, rank=2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    context = (torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool))
    report = training_step_memory(unet, (3, 4, 8, 8), context=context, schedule=memory.make_schedule("cosine", 100))
    assert steps == [("Trainer", (2, 3, 8, 8), False), ("Trainer", (3, 4, 8, 8), True)]
    assert report.precision == "fp32" and "not measured" in str(report)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters()) and not unet.training
