"""Train the shipped stack on a GPU inside one time budget, and bundle what it made into two files.

    python scripts/gpu_train.py --budget 200 --out $OUT/train     # on a CUDA GPU (scripts/gpu_check.py's train step)
    python scripts/gpu_train.py --tiny --device cpu --out /tmp/t   # the same code path on a CPU, in a minute

Each model goes on from the shipped weights with the recipe it was trained with on the CPU (its card's command), by
the same script, for its share of the budget (--max-minutes), each a separate process with its own time limit so a
model that fails or overruns is recorded and the next still runs:

    vae       train_tiny_sd.py --stage vae --vae-part decoder: the decoder alone, so the latent space, and every model
              trained on it, stays valid (SD's ft-MSE VAE did the same)
    t2i       train_tiny_sd.py --stage t2i --init-from: the tiny SD's U-Net on the same latents and the shipped CLIP,
              then --stage cards (FID with the floor, text fidelity, at 398 held-out captions)
    pixel_v   train_ddpm.py --init-from: the pixel v model, then its card (FID with the floor, n = 398)

The mini CLIP is not retrained here: a new text encoder would void the U-Net, the LoRAs, the LCM-LoRA and the
ControlNet trained on its states, which this budget cannot retrain. What the models were trained on top of the
U-Net (LoRA, hypernetwork, LCM-LoRA, ControlNet) are not retrained either; the record says so under "not_covered".

Out: <out>/stack_a.tar (the VAE, the U-Net, the tiny SD's cards and results) and <out>/stack_b.tar (the pixel
model and its card), at most 16 MiB each (the device tool's limit), and <out>/gpu_train.json: the GPU, per model
its command, status, seconds, and the steps and quality its files record. Nothing under checkpoints/ is changed:
whether a GPU model replaces a shipped one is decided here, afterwards, by the same bench scripts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARES = {"vae": 0.25, "t2i": 0.45, "pixel_v": 0.30}        # of the budget, in this order
BUNDLES = {"stack_a.tar": ("vae_emoji32", "tiny_sd_emoji", "clip_emoji", "tiny_sd_results"),
           "stack_b.tar": ("ddpm_emoji32_v",)}
MAX_BUNDLE = 16 * 2**20
NOT_COVERED = ["the mini CLIP (a new text encoder voids every model trained on its states)",
               "the LoRA, the hypernetwork, the LCM-LoRA, the ControlNet and the tiny SD 3 (trained on top of, or "
               "beside, the U-Net; their scripts take the shipped base)"]


def commands(work: Path, device: str, tiny: bool) -> dict[str, list[list[str]]]:
    """Each model's commands (the training, then its measurement where separate); --max-minutes is added per run."""
    py, ck, out = sys.executable, str(ROOT / "checkpoints"), str(work / "ckpt")
    common = ["--device", device, "--no-progress", "--out-dir", out]
    quick = ["--quick"] if tiny else []
    vae = [py, "scripts/train_tiny_sd.py", "--stage", "vae", *quick, *common, "--run-dir", str(work / "vae"),
           "--init-from", ck, "--vae-part", "decoder", "--vae-warmup", "100", "--vae-lr", "2e-4",
           "--vae-steps", "3" if tiny else "20000", "--eval-every", "1000"]
    t2i = [py, "scripts/train_tiny_sd.py", "--stage", "t2i", *quick, *common, "--run-dir", str(work / "t2i"),
           "--t2i-lr", "2e-4", "--t2i-batch", "128", "--t2i-steps", "3" if tiny else "100000"] + \
        ([] if tiny else ["--init-from", ck])     # --tiny: quick mode's own small U-Net, from scratch
    cards = [py, "scripts/train_tiny_sd.py", "--stage", "cards", *quick, *common, "--run-dir", str(work / "t2i")]
    sizes = ["--preset", "tiny", "--steps", "2", "--eval-samples", "16", "--eval-steps", "2"] if tiny else \
        ["--steps", "100000"]
    pixel = [py, "scripts/train_ddpm.py", "--name", "ddpm_emoji32_v", "--prediction", "v", "--zero-terminal-snr",
             "--batch-size", "32", "--lr", "2e-4", *sizes, "--device", device, "--out-dir", out,
             "--run-dir", str(work / "pixel_v")] + ([] if tiny else ["--init-from", f"{ck}/ddpm_emoji32_v.safetensors"])
    return {"vae": [vae], "t2i": [t2i, cards], "pixel_v": [pixel]}


def run(command: list[str], timeout: float) -> dict:
    """One command with a time limit (gpu_check's way): status, seconds, the tail of its output."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check import run_step, step_env
    return run_step(command, timeout if timeout >= 10 else 0, step_env())


def facts(ckpt_dir: Path) -> dict:
    """What the written model files record: steps, training seconds, quality."""
    from course_lib import checkpoint as ckpt
    found = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        info = json.loads(ckpt.read(path)[1].get("info", "{}"))
        keep = ("steps", "train_seconds", "heldout_psnr", "sharpness", "machine")
        found[path.stem] = {k: info[k] for k in keep if k in info} | (
            {"train_steps": info["train_config"]["steps"]} if "train_config" in info else {})
    return found


def bundle(ckpt_dir: Path, out: Path, since: float) -> dict[str, dict]:
    """The files each bundle names that were written after `since` (not the copies the stages read), into one
    uncompressed tar each (safetensors do not compress); name -> bytes, members."""
    written = {}
    for name, stems in BUNDLES.items():
        members = sorted(p for p in ckpt_dir.iterdir() if p.is_file() and p.stat().st_mtime > since
                         and p.name.split(".")[0].removesuffix("_samples") in stems)
        if not members:
            continue
        with tarfile.open(out / name, "w") as tar:
            for p in members:
                tar.add(p, arcname=p.name)
        size = (out / name).stat().st_size
        if size > MAX_BUNDLE:
            raise SystemExit(f"{name} is {size / 2**20:.1f} MiB, over the 16 MiB a file may be to come back")
        written[name] = {"bytes": size, "members": [p.name for p in members]}
    return written


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=200, help="seconds for every model together (default 200)")
    ap.add_argument("--out", type=Path, required=True, help="the folder for the two bundles and gpu_train.json")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="every model a few steps at quick sizes: the code path")
    ap.add_argument("--only", default=",".join(SHARES), help=f"models, comma-separated (default {','.join(SHARES)})")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.only.split(",") if m.strip()]
    if unknown := [m for m in models if m not in SHARES]:
        ap.error(f"unknown model(s) {', '.join(unknown)}; valid are {', '.join(SHARES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA GPU here; for the code path on a CPU use --device cpu --tiny")
    if args.device == "cpu" and not args.tiny:
        ap.error("on a CPU this runs only with --tiny (the shipped models were trained on CPUs already)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_train_"))   # not under --out: only the bundles and the record go back
    (work / "ckpt").mkdir(parents=True, exist_ok=True)
    for stem in ("vae_emoji32", "clip_emoji"):      # what the U-Net's stages read from their out-dir (copy2 keeps
        shutil.copy2(ROOT / "checkpoints" / f"{stem}.safetensors", work / "ckpt" / f"{stem}.safetensors")  # mtime)
    since = time.time()
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    record = {"gpu": gpu, "torch": torch.__version__, "budget_s": args.budget, "models": {},
              "not_covered": NOT_COVERED, "command": " ".join(["python", "scripts/gpu_train.py"] +
                                                              (argv if argv is not None else sys.argv[1:]))}
    deadline = time.monotonic() + args.budget
    plan = commands(work, args.device, args.tiny)
    total = sum(SHARES[m] for m in models)
    for m in models:
        share = args.budget * SHARES[m] / total
        runs, end = [], min(deadline, time.monotonic() + share)
        for k, command in enumerate(plan[m]):
            left = end - time.monotonic()
            train = k == 0                      # the first command trains: it stops itself, leaving time to measure
            extra = ["--max-minutes", f"{max(0.1, (left - 0.4 * share) / 60):.2f}"] if train and not args.tiny else []
            runs.append(run(command + extra, max(left, 0) if k else left + 0.15 * share))
            if runs[-1]["status"] != "ok":
                break
        record["models"][m] = {"runs": runs, "status": "ok" if all(r["status"] == "ok" for r in runs) and
                               len(runs) == len(plan[m]) else runs[-1]["status"]}
        print(f"{m:8s} {record['models'][m]['status']}  {sum(r['seconds'] for r in runs):.0f} s", flush=True)
    try:
        record["files"] = facts(work / "ckpt")
        record["bundles"] = bundle(work / "ckpt", args.out, since)
    finally:
        (args.out / "gpu_train.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(record['bundles'])} and gpu_train.json to {args.out}")
    return record


if __name__ == "__main__":
    main()
