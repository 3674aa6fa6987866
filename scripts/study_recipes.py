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
    tiny_sd  the text-to-image U-Net, trained from scratch on the shipped VAE's latents and mini CLIP's text states
          for --minutes of wall time per recipe (equal time, not equal steps), measured every --eval-minutes:
          shipped        the shipped recipe: preset sd_small, epsilon, scaled-linear, batch 128, lr 3e-4
          lr 1e-3, batch 32, v zero-snr, flow, min-snr 5, sd_tiny: that recipe with one thing changed
          Measured: FID of --n images (one per held-out caption, the pipeline's defaults: DDIM 20, guidance 4)
          against the held-out emoji, beside the caption-matched floor (metrics.floor(match=...)).

    pixel    the pixel-space U-Net (notebooks 04-05), unconditional, trained from scratch for --minutes per recipe
          (equal time), measured every --eval-minutes:
          shipped        the shipped v model's recipe: preset small, v-prediction, cosine rescaled to zero terminal
                         SNR, batch 32, lr 4e-4 (its first 5,000 steps; checkpoints/ddpm_emoji32_v)
          epsilon, lr 1e-3, batch 64, flow, min-snr 5, tiny: that recipe with one thing changed
          Measured: FID of --n samples (DDIM 50 steps, the flow: Euler 50) against the held-out emoji, beside the
          real-versus-real floor at the same n (metrics.floor).

    python scripts/study_recipes.py --base tiny_sd --minutes 8 --recipes shipped,flow    # two recipes, 8 min each
    python scripts/study_recipes.py --base pixel --minutes 8 --recipes shipped,flow
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

from course_lib.checkpoint import shipped, write_text_atomic  # noqa: E402
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
DEFAULT_RECIPES = {"vae": "mse,perceptual,perceptual+gan", "tiny_sd": "shipped", "pixel": "shipped"}
BASES = ("vae", "tiny_sd", "pixel")
PIXEL_SHIPPED = {"batch_size": 32, "lr": 4e-4, "schedule": "cosine", "prediction": "v", "zero_terminal_snr": True}
PIXEL_RECIPES = {     # (U-Net preset, what changes from the shipped v model's recipe)
    "shipped": ("small", {}),
    "epsilon": ("small", {"prediction": "epsilon", "zero_terminal_snr": False}),
    "lr 1e-3": ("small", {"lr": 1e-3}),
    "batch 64": ("small", {"batch_size": 64}),
    "flow": ("small", {"objective": "flow", "timestep_sampling": "logit_normal", "zero_terminal_snr": False}),
    "min-snr 5": ("small", {"min_snr_gamma": 5.0}),
    "tiny": ("tiny", {}),
}
TINY_SD_SHIPPED = {"batch_size": 128, "lr": 3e-4, "schedule": "scaled_linear", "prediction": "epsilon"}
TINY_SD_RECIPES = {   # (U-Net preset, what changes from the shipped recipe)
    "shipped": ("sd_small", {}),
    "lr 1e-3": ("sd_small", {"lr": 1e-3}),
    "batch 32": ("sd_small", {"batch_size": 32}),
    "v zero-snr": ("sd_small", {"prediction": "v", "zero_terminal_snr": True}),
    "flow": ("sd_small", {"objective": "flow", "timestep_sampling": "logit_normal"}),
    "min-snr 5": ("sd_small", {"min_snr_gamma": 5.0}),
    "sd_tiny": ("sd_tiny", {}),
}
RECIPES = {"vae": VAE_RECIPES, "tiny_sd": TINY_SD_RECIPES, "pixel": PIXEL_RECIPES}


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


def study_tiny_sd(args) -> list[dict]:
    """Each recipe from scratch for args.minutes of training, measured every args.eval_minutes (equal time)."""
    import tempfile

    from course_lib.clip import load_clip
    from course_lib.metrics import evaluate
    from course_lib.pipeline import SHIPPED, TextToImage
    from course_lib.train import TrainConfig, Trainer
    from course_lib.unet import UNet, get_preset
    from course_lib.vae import encode_latents
    from train_tiny_sd import conditioning_for

    vae, scale, _ = load_vae(shipped(SHIPPED["vae"]))
    clip, tokenizer, _ = load_clip(shipped(SHIPPED["clip"]))
    train, held = load_emoji(size=32, split="train", limit=64 if args.quick else None), load_emoji(size=32, split="heldout")
    latents = encode_latents(vae, train.images, scale, device=torch.device("cpu"))
    cond = conditioning_for(clip, tokenizer, train.captions, torch.device("cpu"))
    captions, subcategories = held.captions[:args.n], held.subcategories[:args.n]
    rows = []
    for name in args.recipes.split(","):
        preset, change = TINY_SD_RECIPES[name]
        config = TrainConfig(**(TINY_SD_SHIPPED | {"steps": 10 ** 6, "warmup": 200, "latents": True,
                                                   "caption_dropout": 0.1, "seed": args.seed} | change))
        torch.manual_seed(args.seed)
        trainer = Trainer(UNet(get_preset(preset, context_dim=clip.config.text.width)), latents, config,
                          conditioning=cond)
        curve = []
        with tempfile.TemporaryDirectory() as tmp:
            while trainer.seconds < args.minutes * 60 - 1:
                trainer.train(max_seconds=min(args.eval_minutes * 60, args.minutes * 60 - trainer.seconds),
                              progress=False)
                pipe = TextToImage.from_files(trainer.export(Path(tmp) / "unet.safetensors", overwrite=True),
                                              shipped(SHIPPED["clip"]), shipped(SHIPPED["vae"]))
                q = evaluate(pipe.generate(captions, seed=0), match=subcategories)
                curve.append({"step": trainer.step, "seconds": round(trainer.seconds, 1), "fid": round(q.fid, 2),
                              "matched_floor": round(q.floor.fid, 2), "precision": round(q.precision, 3),
                              "recall": round(q.recall, 3)})
                print(f"{name:12s} step {trainer.step:5d} at {trainer.seconds:6.0f} s: FID {q.fid:.2f} "
                      f"(caption-matched floor {q.floor.fid:.2f})", flush=True)
        rows.append({"recipe": name, "preset": preset, "change": change, "steps": trainer.step, "curve": curve})
    return rows


def study_pixel(args) -> list[dict]:
    """Each recipe from scratch for args.minutes of training, measured every args.eval_minutes (equal time)."""
    from course_lib.metrics import evaluate, floor
    from course_lib.train import TrainConfig, Trainer
    from course_lib.unet import UNet, get_preset

    images = load_emoji(size=32, split="train", limit=64 if args.quick else None).images
    reference = floor(n=args.n)                      # the real-versus-real floor at this n
    rows = []
    for name in args.recipes.split(","):
        preset, change = PIXEL_RECIPES[name]
        config = TrainConfig(**(PIXEL_SHIPPED | {"steps": 10 ** 6, "warmup": 200, "seed": args.seed} | change))
        torch.manual_seed(args.seed)
        trainer = Trainer(UNet(get_preset(preset)), images, config)
        curve = []
        while trainer.seconds < args.minutes * 60 - 1:
            trainer.train(max_seconds=min(args.eval_minutes * 60, args.minutes * 60 - trainer.seconds),
                          progress=False)
            t0 = time.perf_counter()
            samples = trainer.sample(args.n, steps=50, seed=args.seed)
            q = evaluate(samples, with_floor=False)
            curve.append({"step": trainer.step, "seconds": round(trainer.seconds, 1), "fid": round(q.fid, 2),
                          "floor": round(reference.fid, 2), "precision": round(q.precision, 3),
                          "recall": round(q.recall, 3), "sample_seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name:12s} step {trainer.step:5d} at {trainer.seconds:6.0f} s: FID {q.fid:.2f} "
                  f"(floor {reference.fid:.2f})", flush=True)
        rows.append({"recipe": name, "preset": preset, "change": change, "steps": trainer.step, "curve": curve})
    return rows


def tiny_sd_table(rows: list[dict]) -> str:
    floor = "caption-matched floor" if "matched_floor" in rows[0]["curve"][0] else "real-vs-real floor"
    lines = [f"| recipe | s per step | FID at each measurement (minutes of training) | last FID / {floor} |",
             "|---|---|---|---|"]
    for r in rows:
        c = r["curve"]
        cells = ", ".join(f"{p['fid']:.1f} ({p['seconds'] / 60:.0f})" for p in c)
        lines.append(f"| {r['recipe']} | {c[-1]['seconds'] / max(1, r['steps']):.2f} | {cells} | "
                     f"{c[-1]['fid'] / c[-1].get('matched_floor', c[-1].get('floor')):.2f}x |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    if "preset" in rows[0]:
        return tiny_sd_table(rows)
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
    p.add_argument("--recipes", default=None, help=f"vae: any of {', '.join(VAE_RECIPES)}; tiny_sd: any of "
                   f"{', '.join(TINY_SD_RECIPES)}; pixel: any of {', '.join(PIXEL_RECIPES)} (default: "
                   f"{DEFAULT_RECIPES})")
    p.add_argument("--minutes", type=float, default=8.0, help="tiny_sd, pixel: minutes of training per recipe")
    p.add_argument("--eval-minutes", type=float, default=4.0, help="tiny_sd, pixel: measure every this many minutes")
    p.add_argument("--n", type=int, default=128, help="tiny_sd: held-out captions measured; pixel: samples")
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
    args.recipes = args.recipes or DEFAULT_RECIPES[args.base]
    valid = RECIPES[args.base]
    unknown = [name for name in args.recipes.split(",") if name not in valid]
    if unknown:                                     # refused before anything loads
        raise SystemExit(f"unknown recipe {unknown[0]!r} for base {args.base}; valid are {', '.join(valid)}")
    if args.quick:
        args.steps, args.eval_every, args.warmup = 2, 1, 2
        args.minutes, args.eval_minutes, args.n = 0.05, 0.05, 16
    out = args.out or (None if args.quick else str(ROOT / "results" / f"recipes_{args.base}.json"))
    if args.base in ("tiny_sd", "pixel"):
        rows = study_tiny_sd(args) if args.base == "tiny_sd" else study_pixel(args)
        print(table(rows))
        record = {"base": args.base, "machine": describe_machine(), "torch": torch.__version__,
                  "threads": args.threads, "minutes": args.minutes, "n": args.n, "seed": args.seed,
                  "shipped_recipe": TINY_SD_SHIPPED if args.base == "tiny_sd" else PIXEL_SHIPPED, "rows": rows,
                  "command": " ".join(["python", "scripts/study_recipes.py"] + sys.argv[1:])}
        return write_record(out, record, ("base", "minutes", "n", "seed", "threads"))
    heldout = load_emoji(size=32, split="heldout").images
    scales = vae_loss_scales(heldout[:32] if args.quick else heldout)
    print(f"loss terms on the shipped VAE's reconstructions of {scales['n']} held-out emoji: squared error "
          f"{scales['mse']}, perceptual distance {scales['perceptual']} ({scales['ratio']}x)")
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
              "command": " ".join(["python", "scripts/study_recipes.py"] + sys.argv[1:]), "rows": rows,
              "started_from": rows[0]["started_from"]}   # rows from another starting VAE are never merged
    write_record(out, record, ("base", "batch", "lr", "warmup", "seed", "started_from"))


def write_record(out: str | None, record: dict, same_keys: tuple[str, ...]) -> None:
    if out:
        if Path(out).exists():      # keep the other recipes' rows of an earlier run with the same settings
            old = json.loads(Path(out).read_text())
            same = all(old.get(k) == record[k] for k in same_keys)
            if same:
                names = {r["recipe"] for r in record["rows"]}
                record["rows"] = [r for r in old["rows"] if r["recipe"] not in names] + record["rows"]
                record["command"] = old.get("command", "") + "; " + record["command"]
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
        print(table(record["rows"]))


if __name__ == "__main__":
    main()
