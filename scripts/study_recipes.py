"""Quality per CPU-minute: short runs of several training recipes for one of the course's shared bases, on this machine.

    python scripts/study_recipes.py --base vae --steps 300          # every recipe, 300 steps each, one thread
    python scripts/study_recipes.py --base vae --quick               # seconds: the same code on a few images

Each recipe continues the shipped model (checkpoints/<base>.safetensors) with a fresh optimizer for the same number
of steps, on the same data, seed and batch, and is measured every --eval-every steps. The table gives quality
against steps and seconds, so the recipes compare at equal steps and, from the seconds, at equal time. The record
goes to results/recipes_<base>.json (with the machine) and the table to stdout.

Bases and recipes:
    vae   mse            squared error + KL, as the shipped VAE was trained (course_lib.vae.fit_vae)
          perceptual     + the LPIPS-style perceptual term on the frozen feature net (course_lib.vae_gan)
          perceptual+gan + the patch discriminator with the adaptive weight, from step 0 (SD's autoencoder)
          perceptual 0.05, perceptual 0.05+gan, gan: the same terms with the perceptual weight at 0.05 (about
                         equal to the squared error, see VAE_RECIPES) or off
          Measured: held-out PSNR (posterior mean, dB) and sharpness (high-frequency share of the reconstructions
          over the originals', course_lib.metrics.high_frequency_share; 1 = as sharp as the data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.checkpoint import shipped  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.feature_net import load_feature_net  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.vae import fit_vae, load_vae  # noqa: E402
from course_lib.vae_gan import fit_vae_gan, perceptual_distance  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from train_tiny_sd import reconstruction_quality  # noqa: E402

VAE_RECIPES = {
    "mse": {},
    "perceptual": {"perceptual_weight": 1.0, "adversarial_weight": 0.0},
    "perceptual+gan": {"perceptual_weight": 1.0, "adversarial_weight": 0.5},
    # the perceptual distance on the shipped VAE's reconstructions is about 20x their squared error (0.33 against
    # 0.017 on 128 held-out emoji), so weight 1 lets it drown the squared error; 0.05 makes the two about equal
    "perceptual 0.05": {"perceptual_weight": 0.05, "adversarial_weight": 0.0},
    "perceptual 0.05+gan": {"perceptual_weight": 0.05, "adversarial_weight": 0.5},
    "gan": {"perceptual_weight": 0.0, "adversarial_weight": 0.5},
}
DEFAULT_RECIPES = "mse,perceptual,perceptual+gan"
BASES = ("vae",)


def vae_quality(vae, images: torch.Tensor) -> dict:
    """Held-out PSNR and sharpness, measured as the VAE stage of train_tiny_sd.py measures them."""
    q = reconstruction_quality(vae, images, torch.device("cpu"))
    return {"psnr": q["heldout_psnr"], "sharpness": q["sharpness"]}


def vae_loss_scales(heldout: torch.Tensor) -> dict:
    """The terms' sizes on the shipped VAE's reconstructions of 128 held-out emoji: squared error against the
    perceptual distance, the ratio that decides a sensible perceptual weight."""
    vae, _, _ = load_vae(shipped("vae_emoji32"))
    x = heldout[:128]
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        perceptual = perceptual_distance(recon, x, load_feature_net("cpu")).mean().item()
    mse = (recon - x).pow(2).mean().item()
    return {"n": len(x), "mse": round(mse, 5), "perceptual": round(perceptual, 4), "ratio": round(perceptual / mse, 1)}


def study_vae(args) -> list[dict]:
    train = load_emoji(size=32, split="train").images
    heldout = load_emoji(size=32, split="heldout").images
    if args.quick:
        train, heldout = train[:64], heldout[:32]
    rows = []
    for name in args.recipes.split(","):
        if name not in VAE_RECIPES:
            raise SystemExit(f"unknown recipe {name!r} for base vae; valid are {', '.join(VAE_RECIPES)}")
        vae, _, before = load_vae(shipped("vae_emoji32"))
        vae.train().requires_grad_(True)
        curve = [{"step": 0, "seconds": 0.0, **vae_quality(vae, heldout)}]

        def log(history, curve=curve, vae=vae):
            if history["steps"] % args.eval_every == 0:
                curve.append({"step": history["steps"], "seconds": round(history["seconds"], 1),
                              **vae_quality(vae, heldout)})
        fit = fit_vae_gan if VAE_RECIPES[name] else fit_vae
        net = ({"perceptual_net": load_feature_net("cpu"), "adversarial_start": args.adversarial_start}
               if VAE_RECIPES[name] else {})
        t0 = time.perf_counter()
        fit(vae, train, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed, progress=False,
            warmup=args.warmup, callback=log, callback_every=1, **VAE_RECIPES[name], **net)
        rows.append({"recipe": name, "steps": args.steps, "wall_seconds": round(time.perf_counter() - t0, 1),
                     "terms": {**VAE_RECIPES[name], **({"adversarial_start": args.adversarial_start}
                                                      if VAE_RECIPES[name].get("adversarial_weight") else {})},
                     "curve": curve, "started_from": f"shipped vae_emoji32 ({before.get('steps')} steps)"})
        last = curve[-1]
        print(f"{name:15s} {args.steps} steps in {last['seconds']:.0f} s of training: PSNR {curve[0]['psnr']:.2f} -> "
              f"{last['psnr']:.2f} dB, sharpness {curve[0]['sharpness']:.3f} -> {last['sharpness']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    steps = [p["step"] for p in rows[0]["curve"]]
    head = "| recipe | s per step | " + " | ".join(f"step {s}: PSNR / sharpness" for s in steps) + " |"
    lines = [head, "|" + "---|" * (2 + len(steps))]
    for r in rows:
        per = r["curve"][-1]["seconds"] / max(1, r["steps"])
        cells = " | ".join(f"{p['psnr']:.2f} / {p['sharpness']:.3f}" for p in r["curve"])
        lines.append(f"| {r['recipe']} | {per:.2f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="vae", choices=BASES)
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"any of: {', '.join(VAE_RECIPES)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up (a fresh AdamW on trained weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adversarial-start", type=int, default=0, help="the step the adversarial term starts (gan recipes)")
    p.add_argument("--scales-only", action="store_true", help="only measure the loss terms' sizes into the record")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the code path")
    p.add_argument("--out", default=None, help="the record (default results/recipes_<base>.json; quick: not written)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.eval_every, args.warmup = 2, 1, 2
    heldout = load_emoji(size=32, split="heldout").images
    scales = vae_loss_scales(heldout[:32] if args.quick else heldout)
    print(f"loss terms on the shipped VAE's reconstructions of {scales['n']} held-out emoji: squared error "
          f"{scales['mse']}, perceptual distance {scales['perceptual']} ({scales['ratio']}x)")
    out = args.out or (None if args.quick else str(ROOT / "results" / f"recipes_{args.base}.json"))
    if args.scales_only:
        if out and Path(out).exists():
            record = json.loads(Path(out).read_text())
            Path(out).write_text(json.dumps(record | {"loss_scales": scales}, indent=1) + "\n")
            print(f"wrote the loss scales into {out}")
        return
    rows = study_vae(args)
    print(table(rows))
    record = {"base": args.base, "machine": describe_machine(), "torch": torch.__version__, "threads": args.threads,
              "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "loss_scales": scales,
              "command": " ".join(["python", "scripts/study_recipes.py"] + sys.argv[1:]), "rows": rows}
    if out:
        if Path(out).exists():      # keep the other recipes' rows of an earlier run with the same settings
            old = json.loads(Path(out).read_text())
            same = all(old.get(k) == record[k] for k in ("base", "batch", "lr", "warmup", "seed"))
            if same:
                names = {r["recipe"] for r in rows}
                record["rows"] = [r for r in old["rows"] if r["recipe"] not in names] + rows
                record["command"] = old.get("command", "") + "; " + record["command"]
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
        print(table(record["rows"]))


if __name__ == "__main__":
    main()
