"""Data parallelism: 2 processes (gloo, CPU) train exactly like 1 process with the same global batch.

The 2-process run is this file itself, started by torchrun from `test_two_processes_train_like_one`:
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_distributed.py OUT_DIR
Each rank trains, then saves what it saw (losses, weights, how many files it wrote) to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint as ckpt  # noqa: E402
from course_lib import distributed  # noqa: E402
from course_lib.train import Conditioning, Trainer, TrainConfig  # noqa: E402
from course_lib.unet import UNet, get_preset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = get_preset("tiny", image_size=16)
STEPS, BATCH = 6, 8                       # 6 steps of a global batch of 8: 4 rows per rank
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-4, atol=3e-5)        # after 6 Adam steps of lr 1e-3 (each moves a weight ~1e-3)


def make_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(20, 3, 16, 16, generator=g) * 2 - 1       # 20 images: a new epoch starts mid-batch


def make(images: torch.Tensor, steps: int = STEPS, batch_size: int = BATCH, **kw) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup=2, hflip=True, **kw)
    return Trainer(UNet(CFG), images, config)


def comparable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights less attention's key bias. Softmax ignores it (it adds the same q.b_k to all of a query's
    scores), so its gradient is zero up to rounding, and Adam, which divides by the gradient's size, turns
    that rounding into steps of ~lr that differ between 1 and 2 processes. The model's outputs do not."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("qkv.bias"):
            q, _, v = value.chunk(3)
            out[name] = torch.cat([q, v])
    return out


def outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = UNet(CFG)
    model.load_state_dict(state)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return model(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 10, 500, 999]))


# --- the worker: runs under torchrun, once per rank ------------------------------------------------------

def worker(out: Path) -> None:
    info = distributed.setup()
    torch.set_num_threads(1)
    writes = 0
    atomic_save = ckpt.atomic_save

    def counted(*args, **kwargs):                       # count the files this rank writes
        nonlocal writes
        writes += 1
        return atomic_save(*args, **kwargs)

    ckpt.atomic_save = counted
    images = make_images()
    ddp = make(images).train(progress=False, checkpoint_path=out / "ddp.safetensors", checkpoint_every=3)
    resumed = Trainer.resume(out / "single3.safetensors", images).train(progress=False)   # 1 process -> 2
    learned = make(images, steps=4, schedule="learned").train(progress=False)
    try:
        make(images, batch_size=7)
        error = ""
    except ValueError as e:
        error = str(e)
    rows = ddp._next_batch()[0].shape[0]               # this rank's share of the global batch
    torch.save({"info": info, "wrapped": type(ddp.net).__name__, "rows": rows, "losses": ddp.losses,
                "model": ddp.model.state_dict(), "ema": ddp.ema.state_dict(), "resumed": resumed.losses,
                "learned": learned.losses, "learned_schedule": learned.learned.state_dict(),
                "writes": writes, "error": error}, out / f"rank{info.rank}.pt")
    distributed.cleanup()


# --- the tests ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no gloo backend")
def test_two_processes_train_like_one(tmp_path):
    images = make_images()
    single = make(images)
    single.train(3, progress=False)
    single.save(tmp_path / "single3.safetensors")      # the 2-process run resumes from this
    single.train(progress=False)
    learned = make(images, steps=4, schedule="learned").train(progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for r, got in enumerate(ranks):
        assert (got["info"].rank, got["info"].world_size, got["wrapped"]) == (r, 2, "DistributedDataParallel")
        assert got["rows"] == BATCH // 2
        torch.testing.assert_close(got["losses"], single.losses, **LOSS_TOL)        # the averaged loss
        torch.testing.assert_close(got["resumed"], single.losses, **LOSS_TOL)       # 1 -> 2 processes at step 3
        torch.testing.assert_close(got["learned"], learned.losses, **LOSS_TOL)
        torch.testing.assert_close(comparable(got["model"]), comparable(single.model.state_dict()), **WEIGHT_TOL)
        torch.testing.assert_close(comparable(got["ema"]), comparable(single.ema.state_dict()), **WEIGHT_TOL)
        torch.testing.assert_close(outputs(got["model"]), outputs(single.model.state_dict()), **WEIGHT_TOL)
        torch.testing.assert_close(got["learned_schedule"], learned.learned.state_dict(), **WEIGHT_TOL)
        assert "batch_size 7" in got["error"] and "divisible by 2" in got["error"]
    assert ranks[0]["losses"] == ranks[1]["losses"]                          # every rank logs the same
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["model"].values(), ranks[1]["model"].values()))
    assert (ranks[0]["writes"], ranks[1]["writes"]) == (2, 0)     # steps 3 and 6 (the end: not written twice), rank 0 only
    diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], single.losses))
    print(f"largest loss difference, 2 processes against 1: {diff:.3g}")

    resumed = Trainer.resume(tmp_path / "ddp.safetensors", images, steps=STEPS + 2)   # 2 processes -> 1
    assert resumed.step == STEPS and not any(k.startswith("module.") for k in resumed.model.state_dict())
    resumed.train(progress=False)
    single.train(STEPS + 2, progress=False)
    torch.testing.assert_close(resumed.losses, single.losses, **LOSS_TOL)
    torch.testing.assert_close(comparable(resumed.model.state_dict()), comparable(single.model.state_dict()),
                               **WEIGHT_TOL)


def test_each_rank_takes_its_slice_of_the_single_process_batch():
    """Pretending to be rank r of 2 in one process: the rows, flips, caption dropout, timesteps and noise are
    the single process's, sliced, so the two half-batch losses average to the full batch's loss."""
    images = make_images()
    g = torch.Generator().manual_seed(1)
    n, L, D = images.shape[0], 5, 32
    cond = Conditioning(torch.randn(n, L, D, generator=g), torch.ones(n, L, dtype=torch.bool),
                        torch.zeros(L, D), torch.ones(L, dtype=torch.bool))

    def trainer(rank: int, world: int) -> Trainer:
        torch.manual_seed(0)
        net = UNet(get_preset("sd_tiny", in_channels=3, out_channels=3, image_size=16, context_dim=D))
        t = Trainer(net, images, TrainConfig(batch_size=BATCH, hflip=True, caption_dropout=0.5), conditioning=cond)
        t.rank, t.world_size = rank, world
        return t

    whole, halves = trainer(0, 1), [trainer(r, 2) for r in range(2)]
    for _ in range(3):                                   # 24 draws from 20 images: crosses an epoch
        x0, (context, mask) = whole._next_batch()
        loss, _ = whole.loss_on(x0, (context, mask))
        parts = [t._next_batch() for t in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x0)
        assert torch.equal(torch.cat([p[1][0] for p in parts]), context)
        assert torch.equal(torch.cat([p[1][1] for p in parts]), mask)
        losses = [t.loss_on(*p)[0] for t, p in zip(halves, parts)]
        torch.testing.assert_close((losses[0] + losses[1]) / 2, loss, **LOSS_TOL)


def test_batch_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size 8 is the global batch.*divisible by 3"):
        make(make_images())


def test_setup_in_one_process_is_a_no_op(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    info = distributed.setup()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.randn(3)
    assert distributed.all_reduce_mean(x) is x
    distributed.barrier()
    distributed.cleanup()
    assert not distributed.is_initialized()


def test_setup_names_the_missing_torchrun_variables(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        distributed.setup()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
