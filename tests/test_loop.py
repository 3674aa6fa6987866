"""The one fitting loop keeps what a trusted trainer promises: crash consistency under kill -9, no good
checkpoint overwritten by exploded weights, stale temporaries removed, checksums verified, clear read and
write errors naming the file, a resume refused when the run differs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from course_lib import checkpoint as ckpt
from course_lib.data import load_emoji
from course_lib.loop import Batches, Fit, FitConfig, TrainingDiverged, lr_factor
from course_lib.train import Trainer, TrainConfig
from course_lib.unet import UNet, get_preset

ROOT = Path(__file__).resolve().parents[1]
CFG = get_preset("tiny", image_size=16)


@pytest.fixture(scope="module")
def images():
    return load_emoji(size=16, limit=32).images


def make(images, steps=6, **kw):
    torch.manual_seed(0)
    return Trainer(UNet(CFG), images, TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=2, **kw))


class Quadratic(Fit):
    """The smallest Fit: fit w to a target with a cosine learning rate, batches of noisy targets."""

    def __init__(self, steps=20, lr=0.1, decay="cosine", seed=0):
        self.w = torch.nn.Parameter(torch.zeros(4))
        super().__init__(FitConfig(steps=steps, lr=lr, warmup=2, decay=decay, grad_clip=1.0, ema_decay=0.9),
                         torch.optim.AdamW([self.w], lr=lr), "cpu", seed=seed)
        self.lr = lr

    def loss(self):
        target = torch.ones(4) + 0.1 * torch.randn(4, generator=self.generator)
        return (self.w - target).pow(2).mean()

    def run_info(self):
        return {"lr": self.lr, "steps": self.fit_config.steps, "decay": self.fit_config.decay}


# --- the loop's pieces ---------------------------------------------------------------------------------

def test_lr_factor_constant_and_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == 1.0
    assert lr_factor(50, 100, 10) == 1.0                                  # constant after warm-up
    assert lr_factor(10, 100, 10, "cosine") == 1.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)       # half way down the cosine
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"unknown decay 'linear'; choose from \['constant', 'cosine'\]"):
        lr_factor(0, 10, 0, "linear")


def test_batches_without_replacement():
    g = torch.Generator().manual_seed(0)
    carry = Batches(10, 4, g)
    seen = torch.cat([carry.next() for _ in range(5)])                   # 20 draws = two full passes
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    drop = Batches(10, 4, g, drop_remainder=True)
    for _ in range(6):
        assert len(set(drop.next().tolist())) == 4                        # never an item twice in a batch
    with pytest.raises(ValueError, match="batch_size >= 1"):
        Batches(10, 0, g)


def test_fit_config_checks():
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        FitConfig(steps=-1, lr=1e-3)
    with pytest.raises(ValueError, match="need lr > 0"):
        FitConfig(steps=1, lr=0)
    with pytest.raises(ValueError, match="unknown decay"):
        FitConfig(steps=1, lr=1e-3, decay="step")
    with pytest.raises(ValueError, match="precision must be resolved"):
        FitConfig(steps=1, lr=1e-3, precision="auto")


def test_a_plain_fit_converges_and_keeps_its_history():
    fit = Quadratic(steps=60, lr=0.2).fit(progress=False)
    assert fit.step == 60 and len(fit.history["loss"]) == 60
    assert fit.history["loss"][-1] < 0.1 * fit.history["loss"][0]
    assert torch.allclose(fit.w.detach(), torch.ones(4), atol=0.2)
    assert not torch.equal(fit.ema_tensors[0], fit.w.detach())            # the EMA lags the weights


def test_checkpoint_every_must_be_positive(images):
    with pytest.raises(ValueError, match=r"checkpoint_every must be an int >= 1 \(steps between calls\)"):
        make(images).train(progress=False, checkpoint_path="unused.safetensors", checkpoint_every=0)
    with pytest.raises(ValueError, match=r"callback_every must be an int >= 1 \(steps between calls\)"):
        Quadratic().fit(progress=False, callback=print, callback_every=0)


# --- resume -------------------------------------------------------------------------------------------

def test_fit_resume_is_exact_and_refuses_another_run(tmp_path):
    path = tmp_path / "q.safetensors"
    whole = Quadratic().fit(progress=False)
    Quadratic().fit(8, progress=False, checkpoint_path=path)
    resumed = Quadratic().load(path).fit(progress=False)
    assert resumed.step == 20 and torch.equal(resumed.w, whole.w)
    assert resumed.history["loss"] == whole.history["loss"]
    with pytest.raises(ValueError, match=r"different run.*steps: checkpoint 20, now 40"):
        Quadratic(steps=40).load(path)                  # the cosine's length changes every step's rate
    with pytest.raises(ValueError, match=r"different run.*lr: checkpoint 0.1, now 0.3; steps: checkpoint 20"):
        Quadratic(steps=40, lr=0.3).load(path)          # the lr may change only when nothing else does


def test_a_resume_may_lower_the_learning_rate_and_says_so(tmp_path, capsys):
    """The divergence advice ("resume from it with a lower learning rate") can be followed."""
    path = tmp_path / "q.safetensors"
    Quadratic().fit(8, progress=False, checkpoint_path=path)
    gentler = Quadratic(lr=0.01).load(path)
    assert "with another learning rate: lr: checkpoint 0.1, now 0.01" in capsys.readouterr().out
    assert gentler.step == 8 and gentler.optimizer.param_groups[0]["peak_lr"] == 0.01
    gentler.fit(progress=False, checkpoint_path=path)
    assert gentler.step == 20 and gentler.optimizer.param_groups[0]["lr"] <= 0.01


def test_a_fresh_run_never_overwrites_another_runs_checkpoint(tmp_path, capsys):
    path = tmp_path / "q.safetensors"
    first = Quadratic().fit(5, progress=False, checkpoint_path=path)
    Quadratic(lr=0.3).fit(3, progress=False, checkpoint_path=path)      # a fresh run to the same path
    kept = tmp_path / "q.v1.safetensors"
    assert "it is kept as" in capsys.readouterr().out and kept.exists()
    assert torch.equal(Quadratic().load(kept).w, first.w) and Quadratic(lr=0.3).load(path).step == 3
    Quadratic().resume_from(path, resume=False)                          # resume=False keeps it too
    assert (tmp_path / "q.v2.safetensors").exists() and not path.exists()
    with pytest.raises(ValueError, match=r"resume=False.*kept as q.v1.v<k>.safetensors"):
        Quadratic(steps=40).resume_from(kept)

    class Growing(Quadratic):                            # a run whose length may change on resume (a fine-tune)
        def run_info(self):
            return {"lr": self.lr}
    Growing(decay="constant").fit(5, progress=False, checkpoint_path=path)
    with pytest.raises(ValueError, match="has trained 5 steps, more than the 4 asked"):
        Growing(steps=4, decay="constant").resume_from(path)
    assert Growing(steps=9, decay="constant").resume_from(path)


def test_trainer_train_resumes_its_own_file_and_export_keeps_an_earlier_model(images, tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    done = make(images, steps=3)
    done.train(progress=False, checkpoint_path=path)
    again = make(images, steps=3)                       # a re-run of the same cell: nothing is retrained
    again.train(progress=False, checkpoint_path=path)
    assert again.step == 3 and "resumed from" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), done.model.state_dict().values()))
    with pytest.raises(ValueError, match=r"train_config.lr.*|different run.*batch_size"):
        Trainer(UNet(CFG), images, TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup=2)).train(
            progress=False, checkpoint_path=path)
    model = tmp_path / "m.safetensors"
    done.export(model)
    done.export(model)
    assert (tmp_path / "m.v1.safetensors").exists() and "earlier model file is kept" in capsys.readouterr().out
    done.export(model, overwrite=True)
    assert not (tmp_path / "m.v2.safetensors").exists()


def test_trainer_resume_refuses_flags_that_differ_naming_them(images, tmp_path):
    path = tmp_path / "c.safetensors"
    make(images, steps=2).train(progress=False, checkpoint_path=path)
    flags = TrainConfig(steps=4, batch_size=8, lr=1.0, warmup=2, prediction="v")
    with pytest.raises(ValueError, match=r"prediction: checkpoint 'epsilon', now 'v'") as refused:
        Trainer.resume(path, images, config=flags)
    assert "lr" not in str(refused.value) and "batch_size" not in str(refused.value)
    same = TrainConfig(steps=4, batch_size=8, lr=5e-4, warmup=2)
    resumed = Trainer.resume(path, images, config=same, steps=4)
    assert resumed.config.lr == 5e-4 and resumed.optimizer.param_groups[0]["peak_lr"] == 5e-4


def test_trainer_resume_refuses_another_image_size(images, tmp_path):
    path = tmp_path / "c.safetensors"
    make(images, steps=2).train(progress=False, checkpoint_path=path)
    other = load_emoji(size=32, limit=32).images
    with pytest.raises(ValueError, match="different run.*data"):
        Trainer.resume(path, other)
    with pytest.raises(ValueError, match="different run.*data"):
        Trainer.resume(path, images.flip(0))              # same shape, other order: other data


# --- never overwrite a good checkpoint with exploded weights -------------------------------------------

def test_exploding_learning_rate_keeps_the_last_good_checkpoint(images, tmp_path):
    path = tmp_path / "c.safetensors"
    trainer = make(images, steps=4).train(progress=False, checkpoint_path=path, checkpoint_every=4)
    good = ckpt.read(path)[0]["param.0"].clone()
    for group in trainer.optimizer.param_groups:
        group["peak_lr"] = 1e8                           # a learning rate that explodes
    with pytest.raises(TrainingDiverged) as info:
        trainer.train(12, progress=False, checkpoint_path=path, checkpoint_every=1)
    message = str(info.value)
    assert "grew from" in message and "were not saved" in message     # caught before the save, not a step late
    assert f"{path} (step 4)" in message                 # says which checkpoint is good
    tensors, meta = ckpt.read(path)
    assert meta["step"] == "4" and torch.equal(tensors["param.0"], good)
    resumed = Trainer.resume(path, images)               # ... and it still continues
    assert resumed.step == 4
    resumed.train(6, progress=False)
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    assert "the same call with a lower learning rate resumes from it" in message
    gentler = make(images, steps=8)                      # the advice, followed: the same call, a lower rate
    gentler.config.lr = 1e-4
    gentler = Trainer(gentler.model, images, gentler.config)
    gentler.train(progress=False, checkpoint_path=path)  # resumes from step 4 (the lr may differ) and trains on
    assert gentler.step == 8 and gentler.optimizer.param_groups[0]["peak_lr"] == 1e-4


def test_nan_loss_names_the_step_and_the_good_checkpoint(tmp_path):
    path = tmp_path / "q.safetensors"
    fit = Quadratic().fit(3, progress=False, checkpoint_path=path)
    with torch.no_grad():
        fit.w.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=rf"at step 3.*{path.name} \(step 3\)"):
        fit.fit(progress=False, checkpoint_path=path)


# --- files: checksums, temporaries, read and write errors ----------------------------------------------

def test_stale_temporaries_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "c.safetensors"
    stale = tmp_path / ".c.safetensors.k3j2h1.tmp"
    stale.write_bytes(b"x" * 1000)                       # what a kill inside a save leaves
    ckpt.atomic_save({"a": torch.ones(3)}, path)
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_text_is_written_atomically_beside_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "cards" / "model.md"
    assert ckpt.write_text_atomic(path, "# card ± 1\n") == path           # makes the folder; UTF-8
    stale = path.parent / ".model.md.k3j2h1.tmp"
    stale.write_text("half a card")                                      # what a kill inside a write leaves
    ckpt.write_text_atomic(path, "# new card\n")
    assert path.read_text() == "# new card\n" and [p.name for p in path.parent.iterdir()] == ["model.md"]
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.write_text_atomic(path, "lost")
    assert path.read_text() == "# new card\n" and [p.name for p in path.parent.iterdir()] == ["model.md"]


def test_a_flipped_byte_or_an_edited_step_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.atomic_save({"a": torch.arange(64.0)}, path, {"step": "5"})
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data[:-3]) + bytes([data[-3] ^ 1]) + bytes(data[-2:]))
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"flipped.safetensors does not match its checksum"):
        ckpt.read(flipped)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(bytes(data).replace(b'"step":"5"', b'"step":"9"'))
    assert edited.read_bytes() != bytes(data)
    with pytest.raises(ckpt.CorruptCheckpoint, match="edited.safetensors does not match its checksum"):
        ckpt.read(edited)


def test_a_file_without_its_checksum_is_refused_and_the_script_adds_one(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "old.safetensors"
    save_file({"a": torch.arange(8.0)}, str(plain), metadata={"format": "x"})        # as files were before
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"old.safetensors has no checksum.*scripts/add_checksum.py"):
        ckpt.read(plain)
    good = tmp_path / "good.safetensors"
    ckpt.atomic_save({"a": torch.arange(8.0)}, good)
    renamed = tmp_path / "renamed.safetensors"     # one flipped bit in the key's name must not turn checking off
    renamed.write_bytes(good.read_bytes().replace(b'"sha256"', b'"sha257"'))
    with pytest.raises(ckpt.CorruptCheckpoint, match="has no checksum"):
        ckpt.read(renamed)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "add_checksum.py"), str(plain)],
                         capture_output=True, text=True, check=True).stdout
    assert "checksum added" in out
    tensors, meta = ckpt.read(plain)
    assert torch.equal(tensors["a"], torch.arange(8.0)) and meta == {"format": "x"}


def test_every_shipped_file_carries_its_checksum():
    files = sorted((ROOT / "checkpoints").glob("*.safetensors"))
    assert len(files) >= 10
    for path in files:
        ckpt.read(path)                                  # refuses a file without one, or a damaged one


def test_keep_earlier_numbers_the_versions(tmp_path):
    path = tmp_path / "m.safetensors"
    assert ckpt.keep_earlier(path) is None
    for k in (1, 2):
        path.write_text(str(k))
        assert ckpt.keep_earlier(path) == tmp_path / f"m.v{k}.safetensors" and not path.exists()
    assert (tmp_path / "m.v2.safetensors").read_text() == "2"


def test_truncated_or_foreign_files_name_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.atomic_save({"a": torch.arange(64.0)}, path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"truncated.safetensors is not a readable.*rebuild it"):
        ckpt.read(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(ckpt.CorruptCheckpoint, match="notes.safetensors is not a readable safetensors file"):
        ckpt.read(text)


def test_write_failures_name_the_file_and_keep_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    ckpt.atomic_save({"a": torch.ones(3)}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match=r"could not write .*c.safetensors.*No space left.*unchanged"):
        ckpt.atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.read(path)[0]["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]      # no temporary left behind
    with pytest.raises(NotADirectoryError, match="a parent of it is a file"):
        ckpt.atomic_save({"a": torch.ones(3)}, path / "inside.safetensors")


# --- kill -9 at random moments --------------------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from course_lib.data import load_emoji
    from course_lib.train import Trainer, TrainConfig
    from course_lib.unet import UNet, get_preset
    path, steps = sys.argv[1], int(sys.argv[2])
    images = load_emoji(size=16, limit=32).images
    try:
        trainer = Trainer.resume(path, images)
    except FileNotFoundError:
        torch.manual_seed(0)
        trainer = Trainer(UNet(get_preset("tiny", image_size=16)), images,
                          TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=2))
    print("ready", flush=True)
    trainer.train(progress=False, checkpoint_path=path, checkpoint_every=1)
    print("done", trainer.step, flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 is POSIX")
def test_kill_minus_nine_at_random_moments_then_resume_is_exact(images, tmp_path):
    steps, rng = 24, random.Random(0)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    path = tmp_path / "run.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    kills = 0
    for trial in range(3):                               # each run trains a little, then dies at a random moment
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(steps)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if path.exists():
            _, meta = ckpt.read(path)                    # whatever is on disk reads and verifies
            assert 0 < int(meta["step"]) <= steps
    assert kills >= 1
    out = subprocess.run([sys.executable, str(script), str(path), str(steps)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert f"done {steps}" in out.stdout, out.stderr
    assert not list(tmp_path.glob(".run.safetensors.*.tmp"))        # no hidden temporaries remain
    reference = tmp_path / "whole.safetensors"                        # the same run, never interrupted, same threads
    out = subprocess.run([sys.executable, str(script), str(reference), str(steps)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert f"done {steps}" in out.stdout, out.stderr
    whole = Trainer.resume(reference, images)
    resumed = Trainer.resume(path, images)
    assert resumed.losses == pytest.approx(whole.losses, abs=0, rel=0)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    json.loads(ckpt.read(path)[1]["run"])


def test_the_rename_is_flushed_by_syncing_the_folder(tmp_path, monkeypatch):
    import stat
    synced = []
    real = os.fsync
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    ckpt.atomic_save({"a": torch.ones(2)}, tmp_path / "c.safetensors")
    assert synced.count(False) >= 1 and synced[-1] is True      # the file's bytes, then the folder's entry
