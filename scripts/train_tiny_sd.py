"""Train the course's tiny Stable Diffusion: the VAE, the mini CLIP and the text-to-image U-Net.

    python scripts/train_tiny_sd.py                       # every stage, then measure and write the cards
    python scripts/train_tiny_sd.py --stage vae           # one stage: vae, clip, t2i or cards
    python scripts/train_tiny_sd.py --quick --out-dir /tmp/sd   # seconds-long smoke run of the same code

Stages (each resumes from its training state in --run-dir if interrupted; run the same command again):
    vae    KL autoencoder on 32 px train-split Noto emoji -> checkpoints/vae_emoji32.safetensors
           (with --sweep, also a short run of each VAE preset, for the reconstruction-vs-size table)
    clip   BPE tokenizer + mini CLIP on the train-split images and captions -> checkpoints/clip_emoji.safetensors
    t2i    the U-Net with cross-attention on the VAE's scaled latents, conditioned on the mini CLIP's text
           states, caption dropout 10% -> checkpoints/tiny_sd_emoji.safetensors
    cards  measure all three (held-out PSNR; held-out retrieval; FID/KID with floor, text fidelity and a
           guidance sweep from held-out captions) and write the model cards (checkpoints/*.md)

Everything a stage measures goes into checkpoints/tiny_sd_results.json as well, for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint as ckpt  # noqa: E402
from course_lib.memory import measure_peak  # noqa: E402
from course_lib.unet_file import load_model  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.clip import (MiniCLIP, clip_config, encode_prompts, fit_clip, load_clip,  # noqa: E402
                             retrieval_accuracy, save_clip, similarity)
from course_lib.tokenizer import Tokenizer  # noqa: E402
from course_lib.metrics import high_frequency_share, psnr  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.flow import TIMESTEP_SAMPLING  # noqa: E402
from course_lib.train import OBJECTIVES, Conditioning, TrainConfig, Trainer, resolve_precision  # noqa: E402
from course_lib.unet import UNet, count_parameters, get_preset  # noqa: E402
from course_lib.vae import (DEFAULT_KL_WEIGHT, VAE, decode_latents, encode_latents, fit_vae,  # noqa: E402
                            latent_scale_factor, load_vae, save_vae)
from course_lib.vae import VAE_PARTS, vae_preset  # noqa: E402
from course_lib.loop import DECAYS  # noqa: E402
from course_lib.vae_gan import fit_vae_gan  # noqa: E402
from course_lib.feature_net import load_feature_net  # noqa: E402

NAMES = {"vae": "vae_emoji32", "clip": "clip_emoji", "t2i": "tiny_sd_emoji"}
STAGES = ("vae", "clip", "t2i", "cards")


def precision_for(device: torch.device) -> str:
    """The Trainer's automatic choice, less fp16 (fit_vae and fit_clip take fp32 or bf16)."""
    return "bf16" if resolve_precision("auto", device) == "bf16" else "fp32"


def command() -> str:
    return " ".join(["python", "scripts/train_tiny_sd.py"] + sys.argv[1:])


def results_path(args) -> Path:
    return Path(args.out_dir) / "tiny_sd_results.json"


def update_results(args, key: str, value) -> None:
    path = results_path(args)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    ckpt.write_text_atomic(path, json.dumps(data, indent=1))


def with_peak(fn, device: torch.device, what: str):
    """fn()'s result and the peak GPU memory it reached in GiB (course_lib.memory.measure_peak; None on a CPU)."""
    result = []
    report = measure_peak(lambda: result.append(fn()), device, what)
    return result[0], report.peak_gib


# --- stage 1: the VAE -------------------------------------------------------------------------------------

def reconstruct(vae: VAE, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each image through the VAE (the posterior mean; course_lib.vae.encode_latents, decode_latents unscaled),
    clamped to [-1, 1], on the CPU; the VAE's train or eval mode is kept (this runs during training)."""
    was_training = vae.training
    vae.eval()
    out = decode_latents(vae, encode_latents(vae, images, 1.0, device=device), 1.0, device=device)
    vae.train(was_training)
    return out


def heldout_psnr(vae: VAE, images: torch.Tensor, device: torch.device) -> float:
    return psnr(reconstruct(vae, images, device), images).mean().item()


def reconstruction_quality(vae: VAE, images: torch.Tensor, device: torch.device) -> dict:
    """Held-out PSNR and sharpness (high-frequency share of the reconstructions over the originals')."""
    recon = reconstruct(vae, images, device)
    return {"heldout_psnr": round(psnr(recon, images).mean().item(), 3),
            "sharpness": round(high_frequency_share(recon) / high_frequency_share(images), 4)}


def curve_logger(path: Path, measure, every: int, offset: int = 0):
    """A training callback that measures every `every` steps and keeps the points in `path` (JSON, by step, so a
    resumed run continues the same curve); offset: the steps the weights had before this run."""
    points = json.loads(path.read_text()) if path.exists() else []

    def log(history: dict) -> None:
        step = history["steps"]
        if step % every and step != 1:
            return
        point = {"step": offset + step, "seconds": round(history["seconds"], 1), **measure()}
        points[:] = [q for q in points if q["step"] != point["step"]] + [point]
        ckpt.write_text_atomic(path, json.dumps(sorted(points, key=lambda q: q["step"]), indent=1))
        print("curve", point, flush=True)
    return log, points


def before_summary(info: dict) -> dict | None:
    """What an --init-from checkpoint had been through, for the model card."""
    if not info:
        return None
    first = info.get("initialised_from") or {}       # and the chain before it: CPU time and steps to the first run
    earlier = {"earlier_seconds": (first.get("train_seconds") or 0) + (first.get("earlier_seconds") or 0),
               "earlier_steps": (first.get("steps") or 0) + (first.get("earlier_steps") or 0)}
    return {k: v for k in ("steps", "train_seconds", "machine", "command", "precision", "heldout_psnr", "sharpness")
            if (v := info.get(k)) is not None} | {k: v for k, v in earlier.items() if v}


def stage_vae(args, device: torch.device) -> None:
    train = load_emoji(size=32, split="train").images
    heldout = load_emoji(size=32, split="heldout").images
    if args.quick:
        train, heldout = train[:64], heldout[:32]
    precision = precision_for(device)
    sweep = []
    if args.sweep:
        for name in args.sweep_presets.split(","):
            torch.manual_seed(args.seed)
            vae = VAE(vae_preset(name))
            history = fit_vae(vae, train, steps=args.sweep_steps, batch_size=args.vae_batch, lr=args.vae_lr,
                              kl_weight=args.kl_weight, device=device, precision=precision, seed=args.seed,
                              progress=not args.no_progress)
            row = {"preset": name, "latent_shape": list(vae.config.latent_shape),
                   "compression": vae.config.compression, "params": count_parameters(vae),
                   "steps": args.sweep_steps, "seconds": round(history["seconds"], 1),
                   "heldout_psnr": round(heldout_psnr(vae, heldout, device), 2)}
            sweep.append(row)
            print("sweep", row, flush=True)
        update_results(args, "vae_sweep", {"rows": sweep, "machine": describe_machine(), "command": command()})

    torch.manual_seed(args.seed)
    vae = VAE(vae_preset(args.vae_preset))
    before, init_scale = {}, None
    if args.vae_part == "decoder" and not args.init_from:
        raise SystemExit("--vae-part decoder fine-tunes a trained VAE's decoder: pass --init-from with its folder")
    if args.init_from:
        vae, init_scale, before = load_vae(Path(args.init_from) / f"{NAMES['vae']}.safetensors")
        vae.train().requires_grad_(True)
        print(f"VAE initialised from {args.init_from} ({before.get('steps')} steps on {before.get('machine')})")
    state = Path(args.run_dir) / f"{NAMES['vae']}.train.safetensors"
    log, curve = curve_logger(Path(args.run_dir) / f"{NAMES['vae']}.curve.json",
                              lambda: reconstruction_quality(vae, heldout, device), args.eval_every)
    adversarial = args.perceptual_weight > 0 or args.adversarial_weight > 0
    if adversarial and (args.vae_part != "all" or args.vae_decay != "constant"):
        raise SystemExit("--vae-part decoder and --vae-decay cosine are for the squared-error VAE training; the "
                         "perceptual / adversarial one trains all of it at a constant rate")
    part = {} if adversarial else {"part": args.vae_part, "decay": args.vae_decay}
    terms = ({"perceptual_weight": args.perceptual_weight, "adversarial_weight": args.adversarial_weight,
              "adversarial_start": args.adversarial_start, "d_lr": args.d_lr or args.vae_lr} if adversarial else {})
    net = {"perceptual_net": load_feature_net(device)} if adversarial else {}
    history, peak = with_peak(lambda: (fit_vae_gan if adversarial else fit_vae)(
        vae, train, steps=args.vae_steps, batch_size=args.vae_batch, lr=args.vae_lr, kl_weight=args.kl_weight,
        device=device, precision=precision, seed=args.seed, checkpoint_path=state, checkpoint_every=250,
        progress=not args.no_progress, callback=log, callback_every=1, warmup=args.vae_warmup,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None, **terms, **net, **part), device,
        "VAE training")
    # the decoder alone: the encoder, so the latents and their scale, unchanged (every latent model stays valid)
    scale = init_scale if args.vae_part == "decoder" else latent_scale_factor(
        vae, train, generator=torch.Generator().manual_seed(args.seed), device=device)
    quality = reconstruction_quality(vae, heldout, device)
    info = {"steps": history["steps"], "train_seconds": round(history["seconds"], 1), "machine": describe_machine(),
            "command": command(), "preset": args.vae_preset, "batch_size": args.vae_batch, "lr": args.vae_lr,
            "initialised_from": before_summary(before), "loss_terms": terms or None, "curve": curve,
            "kl_weight": args.kl_weight, "warmup": args.vae_warmup, **part, "precision": precision, "seed": args.seed,
            "n_images": train.shape[0],
            "heldout_psnr": round(quality["heldout_psnr"], 2), "sharpness": quality["sharpness"],
            "peak_gib": peak, "params": count_parameters(vae)}
    value = quality["heldout_psnr"]
    out = save_vae(Path(args.out_dir) / f"{NAMES['vae']}.safetensors", vae.cpu(), scale, info)
    print(f"VAE: held-out PSNR {value:.2f} dB, scale factor {scale:.4f}, {history['steps']} steps in "
          f"{history['seconds']:.0f} s -> {out}", flush=True)
    update_results(args, "vae", info | {"scale_factor": scale})


# --- stage 2: the mini CLIP --------------------------------------------------------------------------------

def stage_clip(args, device: torch.device) -> None:
    train = load_emoji(size=32, split="train")
    heldout = load_emoji(size=32, split="heldout")
    images, captions = train.images, train.captions
    if args.clip_twemoji:       # the same training emoji drawn by Twemoji too: one more style per caption
        tw = load_emoji(size=32, split="train", style="twemoji")
        images, captions = torch.cat([images, tw.images]), captions + tw.captions
    if args.quick:
        images, captions = images[:64], captions[:64]
    torch.manual_seed(args.seed)
    before, start = {}, Path(args.init_from or "") / f"{NAMES['clip']}.safetensors"
    if args.init_from and start.exists():   # continue an exported CLIP: its weights and its tokenizer
        clip, tokenizer, before = load_clip(start)
        if clip.config != clip_config(args.clip_preset, tokenizer.vocab_size):
            raise SystemExit(f"{start} is not a {args.clip_preset!r} CLIP with {tokenizer.vocab_size} tokens; "
                             f"pass the --clip-preset and --vocab-size it was trained with")
        clip.train().requires_grad_(True)
        print(f"CLIP initialised from {start} ({before.get('steps')} steps on {before.get('machine')})")
    else:
        tokenizer = Tokenizer.train(train.captions, vocab_size=args.vocab_size)
        clip = MiniCLIP(clip_config(args.clip_preset, tokenizer.vocab_size))
    state = Path(args.run_dir) / f"{NAMES['clip']}.train.safetensors"
    precision = precision_for(device)
    n_train = min(398, len(train.captions))
    # a seeded random 398 training emoji, as notebook 08 picks them (the first 398 in the fixed order are a few
    # categories' skin-tone variants, whose captions are far harder to tell apart: 81% against 95% top-1 once)
    pick = torch.randperm(len(train.captions), generator=torch.Generator().manual_seed(0))[:n_train]
    seen_images, seen_captions = train.images[pick], [train.captions[i] for i in pick.tolist()]

    def retrieval() -> dict:
        was_training = clip.training
        clip.eval()
        held = retrieval_accuracy(similarity(clip, tokenizer, heldout.images, heldout.captions, device=device))
        seen = retrieval_accuracy(similarity(clip, tokenizer, seen_images, seen_captions, device=device))
        clip.train(was_training)
        return {"heldout_top1": round(held[1], 4), "heldout_top5": round(held[5], 4), "train_top1": round(seen[1], 4)}
    log, curve = curve_logger(Path(args.run_dir) / f"{NAMES['clip']}.curve.json", retrieval, args.eval_every)
    history, peak = with_peak(lambda: fit_clip(
        clip, tokenizer, images, captions, steps=args.clip_steps, batch_size=args.clip_batch, lr=args.clip_lr,
        device=device, precision=precision, seed=args.seed, checkpoint_path=state, checkpoint_every=250,
        progress=not args.no_progress, callback=log, callback_every=1,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None), device, "CLIP training")
    clip.eval()
    sim = similarity(clip, tokenizer, heldout.images, heldout.captions, device=device)
    acc = retrieval_accuracy(sim)
    acc_train = retrieval_accuracy(similarity(clip, tokenizer, seen_images, seen_captions, device=device))
    info = {"steps": history["steps"], "train_seconds": round(history["seconds"], 1), "machine": describe_machine(),
            "command": command(), "preset": args.clip_preset, "vocab_size": tokenizer.vocab_size,
            "batch_size": args.clip_batch, "lr": args.clip_lr, "precision": precision, "seed": args.seed,
            "n_images": images.shape[0], "heldout_top1": acc[1], "heldout_top5": acc[5], "curve": curve,
            "twemoji": args.clip_twemoji, "initialised_from": before_summary(before),
            "n_heldout": len(heldout.captions), "train_top1": acc_train[1], "train_top5": acc_train[5],
            "n_train_eval": n_train, "peak_gib": peak, "params": count_parameters(clip)}
    out = save_clip(Path(args.out_dir) / f"{NAMES['clip']}.safetensors", clip.cpu(), tokenizer, info)
    print(f"CLIP: held-out retrieval top-1 {acc[1]:.3f}, top-5 {acc[5]:.3f} (among {len(heldout.captions)}); "
          f"train top-1 {acc_train[1]:.3f} -> {out}", flush=True)
    update_results(args, "clip", info)


# --- stage 3: the text-to-image U-Net ------------------------------------------------------------------------

def conditioning_for(clip, tokenizer, captions: list[str], device) -> Conditioning:
    chunks = [encode_prompts(clip, tokenizer, captions[i:i + 512], device=device) for i in range(0, len(captions), 512)]
    context = torch.cat([c.float().cpu() for c, _ in chunks])
    mask = torch.cat([m.cpu() for _, m in chunks])
    null, null_mask = encode_prompts(clip, tokenizer, [""], device=device)
    return Conditioning(context, mask, null[0].float().cpu(), null_mask[0].cpu())


def stage_t2i(args, device: torch.device) -> None:
    out_dir = Path(args.out_dir)
    vae, scale, _ = load_vae(out_dir / f"{NAMES['vae']}.safetensors", device=device)
    clip, tokenizer, _ = load_clip(out_dir / f"{NAMES['clip']}.safetensors", device=device)
    train = load_emoji(size=32, split="train")
    images, captions = train.images, train.captions
    if args.quick:
        images, captions = images[:64], captions[:64]
    latents = encode_latents(vae, images, scale, device=device)
    cond = conditioning_for(clip, tokenizer, captions, device)
    state = Path(args.run_dir) / f"{NAMES['t2i']}.train.safetensors"
    init_file = Path(args.run_dir) / f"{NAMES['t2i']}.init.json"   # what --init-from started from, kept for resumes
    config = TrainConfig(steps=args.t2i_steps, batch_size=args.t2i_batch, lr=args.t2i_lr, warmup=200,
                         schedule=args.schedule, prediction=args.prediction, latents=True,
                         caption_dropout=0.1, ema_decay=args.ema, seed=args.seed,
                         objective=args.objective, timestep_sampling=args.timestep_sampling)
    if state.exists():      # flags that differ from the checkpoint's settings are refused, naming them
        trainer = Trainer.resume(state, latents, device=device, steps=args.t2i_steps, conditioning=cond, config=config)
        print(f"resumed at step {trainer.step} of {args.t2i_steps}", flush=True)
    else:
        torch.manual_seed(args.seed)
        unet = UNet(get_preset(args.unet_preset, context_dim=clip.config.text.width))
        if args.init_from:
            start, _, before = load_model(Path(args.init_from) / f"{NAMES['t2i']}.safetensors")
            unet.load_state_dict(start.state_dict())
            unet.requires_grad_(True)
            ckpt.write_text_atomic(init_file, json.dumps(before_summary(before)))
            print(f"U-Net initialised from {args.init_from} ({before.get('steps')} steps on {before.get('machine')})")
        trainer = Trainer(unet, latents, config, device=device, conditioning=cond)
    _, peak = with_peak(lambda: trainer.train(checkpoint_path=state, checkpoint_every=1000,
                                              progress=not args.no_progress,
                                              max_seconds=args.max_minutes * 60 if args.max_minutes else None),
                        device, "text-to-image training")
    info = {"machine": describe_machine(), "command": command(), "preset": args.unet_preset,
            "vae": NAMES["vae"], "clip": NAMES["clip"], "scale_factor": scale, "peak_gib": peak,
            "initialised_from": json.loads(init_file.read_text()) if init_file.exists() else None,
            "params": count_parameters(trainer.model), "precision": trainer.precision}
    out = trainer.export(out_dir / f"{NAMES['t2i']}.safetensors", info=info, overwrite=True)
    print(f"T2I U-Net: {trainer.step} steps in {trainer.seconds:.0f} s, final loss "
          f"{np.mean(trainer.losses[-100:]):.4f} -> {out}", flush=True)
    update_results(args, "t2i", info | {"steps": trainer.step, "train_seconds": round(trainer.seconds, 1),
                                        "final_loss": float(np.mean(trainer.losses[-100:]))})


# --- stage 4: measure and write the cards ---------------------------------------------------------------------

def stage_cards(args, device: torch.device) -> None:
    from course_lib import metrics
    from course_lib.pipeline import TextToImage

    out_dir = Path(args.out_dir)
    pipe = TextToImage.from_files(out_dir / f"{NAMES['t2i']}.safetensors", out_dir / f"{NAMES['clip']}.safetensors",
                                  out_dir / f"{NAMES['vae']}.safetensors", device=device)
    heldout = load_emoji(size=32, split="heldout")
    prompts, real = heldout.captions, heldout.images
    if args.quick:
        prompts, real = prompts[:16], real[:16]
    n = len(prompts)
    real_sim = similarity(pipe.clip, pipe.tokenizer, real, prompts, device=device)
    real_acc = retrieval_accuracy(real_sim)
    rows = []
    samples_at = {}
    for g in [float(x) for x in args.guidance.split(",")]:
        t0 = time.perf_counter()
        images = pipe.generate(prompts, batch_size=256, seed=args.seed, steps=args.eval_steps, guidance_scale=g)
        seconds = time.perf_counter() - t0
        sim = similarity(pipe.clip, pipe.tokenizer, images, prompts, device=device)
        acc = retrieval_accuracy(sim)
        quality = metrics.evaluate(images, reference="heldout")
        feats = metrics.features(images)
        # diversity, roughly: the mean per-feature standard deviation over all images (one per prompt)
        rows.append({"guidance": g, "top1": acc[1], "top5": acc[5], "clip_score": sim.diag().mean().item(),
                     "fid": quality.fid, "kid": quality.kid_mean, "kid_std": quality.kid_std,
                     "feature_spread": feats.std(0).mean().item(), "seconds": round(seconds, 1)})
        samples_at[g] = images
        print("guidance", rows[-1], flush=True)
    floor = metrics.floor(n=n)
    t2i_result = {"n": n, "steps": args.eval_steps, "sampler": "ddim", "rows": rows,
                  "real_top1": real_acc[1], "real_top5": real_acc[5],
                  "floor_fid": floor.fid, "floor_kid": floor.kid_mean, "floor_kid_std": floor.kid_std,
                  "real_feature_spread": metrics.features(real).std(0).mean().item(),
                  "machine": describe_machine(), "command": command()}
    update_results(args, "t2i_eval", t2i_result)
    best = max(rows, key=lambda r: r["top1"])
    show = samples_at[best["guidance"]]
    memo = metrics.memorisation(show, load_emoji(size=32, split="train").images)
    t2i_result["memorisation"] = {"guidance": best["guidance"], "share": memo.share, "threshold": memo.threshold,
                                  "space": memo.space, "n": int(show.shape[0])}
    update_results(args, "t2i_eval", t2i_result)
    save_grid_png(torch.stack([x for pair in zip(real[:32], show[:32]) for x in pair]),
              out_dir / f"{NAMES['t2i']}_samples.png", columns=16)
    write_cards(args, out_dir, t2i_result)


def started_from(info: dict) -> list[str]:
    """A model-card row for a model trained on from another run's weights (--init-from)."""
    first = info.get("initialised_from")
    if not first:
        return []
    details = ", ".join(f"{k.replace('_', ' ')} {first[k]}" for k in ("precision", "kl_weight", "batch_size", "lr")
                        if first.get(k) is not None)
    return [f"| started from | the weights of an earlier run: {first.get('steps')} steps on {first.get('machine')} "
            f"({details}; {first.get('train_seconds')} s), made by `{first.get('command')}` |"]


def cpu_hours(info: dict) -> list[str]:
    """A model-card row: the training time of this run and of the run it started from, in CPU-hours."""
    total = ckpt.with_chain_totals(dict(info))["train_seconds_total"]
    since = (" (this run and the runs it started from; earlier GPU steps not counted)"
             if total > (info.get("train_seconds") or 0) else "")
    return [f"| CPU-hours | {total / 3600:.2f}{since} |"]


def steps_before(info: dict) -> int:
    """The steps of the runs a model started from (its curve's offset)."""
    return ckpt.with_chain_totals(dict(info))["steps_total"] - (info.get("steps") or 0)


def curve_lines(curve: list[dict], columns: dict[str, str], offset: int = 0, every: int = 2) -> list[str]:
    """Quality against steps as a table (every `every`-th point and the last); offset: steps before this run."""
    if not curve:
        return []
    points = curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else [])
    return (["## Quality against steps", "",
             "| steps | CPU-hours of this run | " + " | ".join(columns.values()) + " |",
             "|---:|---:|" + "---:|" * len(columns)]
            + [f"| {offset + p['step']:,} | {p['seconds'] / 3600:.2f} | "
               + " | ".join(f"{p[k]:.3f}" for k in columns) + " |" for p in points] + [""])


def write_cards(args, out_dir: Path, t2i: dict) -> None:
    results = json.loads(results_path(args).read_text())
    vae, clip, t2 = results.get("vae", {}), results.get("clip", {}), results.get("t2i", {})
    gib = lambda v: ("not measured in this run (no GPU); for the notebooks' full-mode steps on an H100 see "
                     "results/memory_full_mode_h100.json" if v is None else f"{v:.2f} GiB")
    sweep = results.get("vae_sweep", {}).get("rows", [])
    lines = [f"# Model card: {NAMES['vae']}", "",
             "A KL autoencoder (course_lib.vae) that maps 32x32 Noto emoji to latents and back; the latent "
             "space of the course's tiny Stable Diffusion.", "",
             "| | |", "|---|---|",
             f"| file | `checkpoints/{NAMES['vae']}.safetensors` (float16) |",
             f"| architecture | course_lib.vae preset `{vae.get('preset')}`, {vae.get('params', 0):,} parameters |",
             f"| data | Noto emoji, training split ({vae.get('n_images')} images), 32 px |",
             f"| training | {vae.get('steps')} steps, batch {vae.get('batch_size')}, AdamW lr {vae.get('lr')}, "
             f"KL weight {vae.get('kl_weight')}, {vae.get('precision')}, seed {vae.get('seed')}"
             f"{', warm-up ' + str(vae['warmup']) if vae.get('warmup') else ''}"
             f"{', cosine decay to 0' if vae.get('decay') == 'cosine' else ''}"
             f"{'; the decoder alone (the encoder, so the latent space and its scale, unchanged)' if vae.get('part') == 'decoder' else ''} |",
             f"| hardware, time | {vae.get('machine')}, {vae.get('train_seconds')} s of training |",
             *started_from(vae), *cpu_hours(vae),
             f"| peak GPU memory (training) | {gib(vae.get('peak_gib'))} |",
             f"| latent scale factor | {vae.get('scale_factor', float('nan')):.4f} (1 / std of the training latents) |",
             f"| held-out reconstruction PSNR | {vae.get('heldout_psnr')} dB (398 held-out emoji, posterior mean) |",
             f"| command | `{vae.get('command')}` |", "",
             *curve_lines(vae.get("curve", []), {"heldout_psnr": "held-out PSNR (dB)", "sharpness": "sharpness"},
                          steps_before(vae))]
    if sweep:
        lines += ["## Why this latent size", "",
                  f"Each preset trained for the same {sweep[0]['steps']} steps ({results['vae_sweep']['machine']}):", "",
                  "| preset | latent (C, h, w) | compression | parameters | held-out PSNR (dB) | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {tuple(r['latent_shape'])} | {r['compression']:.0f}x | {r['params']:,} | "
                  f"{r['heldout_psnr']} | {r['seconds']} |" for r in sweep]
        lines += [""]
    lines += ["Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""]
    ckpt.write_text_atomic(out_dir / f"{NAMES['vae']}.md", "\n".join(lines))

    lines = [f"# Model card: {NAMES['clip']}", "",
             "A mini CLIP (course_lib.text): a BPE tokenizer trained on the emoji captions, a transformer text "
             "encoder and a small CNN image encoder, trained contrastively on Noto emoji and their Unicode names. "
             "Its text encoder conditions the tiny Stable Diffusion; its score measures text fidelity.", "",
             "| | |", "|---|---|",
             f"| file | `checkpoints/{NAMES['clip']}.safetensors` (float16, tokenizer inside) |",
             f"| architecture | course_lib.text preset `{clip.get('preset')}`, {clip.get('params', 0):,} parameters, "
             f"vocabulary {clip.get('vocab_size')} |",
             f"| data | Noto emoji, training split ({clip.get('n_images')} images and captions), 32 px |",
             f"| training | {clip.get('steps')} steps, batch {clip.get('batch_size')}, lr {clip.get('lr')}, "
             f"{clip.get('precision')}, seed {clip.get('seed')} |",
             f"| hardware, time | {clip.get('machine')}, {clip.get('train_seconds')} s of training |",
             *started_from(clip), *cpu_hours(clip),
             f"| peak GPU memory (training) | {gib(clip.get('peak_gib'))} |",
             f"| command | `{clip.get('command')}` |", "",
             "## Retrieval (image -> its own caption)", "",
             "| images | among | top-1 | top-5 |", "|---|---|---|---|",
             f"| held-out emoji (new base emoji) | their {clip.get('n_heldout')} captions | "
             f"{clip.get('heldout_top1', 0):.3f} | {clip.get('heldout_top5', 0):.3f} |",
             f"| training emoji, a seeded random {clip.get('n_train_eval')} (as notebook 08 picks them) | their captions | {clip.get('train_top1', 0):.3f} | "
             f"{clip.get('train_top5', 0):.3f} |",
             f"| chance | {clip.get('n_heldout')} captions | {1 / max(1, clip.get('n_heldout', 1)):.3f} | "
             f"{5 / max(1, clip.get('n_heldout', 1)):.3f} |", "",
             *curve_lines(clip.get("curve", []), {"heldout_top1": "held-out top-1", "heldout_top5": "held-out top-5"},
                          steps_before(clip)),
             "Licence: derived from Noto Emoji images (Apache-2.0) and Unicode character names; see "
             "data/emoji/LICENSES.md.", ""]
    ckpt.write_text_atomic(out_dir / f"{NAMES['clip']}.md", "\n".join(lines))

    tc = json.loads(ckpt.read(out_dir / f"{NAMES['t2i']}.safetensors")[1]["info"])["train_config"]
    lines = [f"# Model card: {NAMES['t2i']}", "",
             "The text-to-image U-Net of the course's tiny Stable Diffusion: it denoises the VAE's 8x8x4 latents "
             f"({NAMES['vae']}), reading the mini CLIP's text states ({NAMES['clip']}) through cross-attention. "
             "Use it through `course_lib.pipeline.TextToImage.from_shipped()`.", "",
             "| | |", "|---|---|",
             f"| file | `checkpoints/{NAMES['t2i']}.safetensors` (EMA weights, float16) |",
             f"| architecture | course_lib.unet preset `{t2.get('preset')}`, {t2.get('params', 0):,} parameters |",
             f"| objective | {tc['prediction']} prediction, {tc['schedule']} schedule, T = {tc['T']}, "
             f"caption dropout {tc['caption_dropout']} |",
             f"| training | {t2.get('steps')} steps, batch {tc['batch_size']}, AdamW lr {tc['lr']}, EMA {tc['ema_decay']}, "
             f"{t2.get('precision')}, seed {tc['seed']} |",
             f"| hardware, time | {t2.get('machine')}, {t2.get('train_seconds')} s of training |",
             *started_from(t2), *cpu_hours(t2),
             f"| peak GPU memory (training) | {gib(t2.get('peak_gib'))} |",
             f"| command | `{t2.get('command')}` |", "",
             "## Measured", "",
             f"{t2i['n']} images, one per held-out caption (emoji the models never saw), DDIM {t2i['steps']} steps, "
             f"measured on {t2i['machine']} by `{t2i['command']}`. Text fidelity: the share of images whose own caption the mini CLIP "
             f"ranks first (top-5) among all {t2i['n']} held-out captions; real held-out images get "
             f"{t2i['real_top1']:.3f} ({t2i['real_top5']:.3f}). FID/KID against the held-out images in the "
             f"course's feature space; the floor (real vs real at this n) is FID {t2i['floor_fid']:.2f}, "
             f"KID {t2i['floor_kid']:.3f}. Spread: the mean per-feature standard deviation over the images "
             f"(real: {t2i['real_feature_spread']:.3f}), a rough measure of diversity.", "",
             "| guidance scale | top-1 | top-5 | CLIP score | FID | KID | spread | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['guidance']:g} | {r['top1']:.3f} | {r['top5']:.3f} | {r['clip_score']:.3f} | {r['fid']:.2f} | "
              f"{r['kid']:.3f} ± {r['kid_std']:.3f} | {r['feature_spread']:.3f} | {r['seconds']} |" for r in t2i["rows"]]
    memo = t2i.get("memorisation")
    if memo:
        lines += ["", f"Memorisation (guidance {memo['guidance']:g}): {100 * memo['share']:.1f}% of the {memo['n']} images "
                      f"have a training image closer than the threshold ({memo['threshold']:.3g} RMS, {memo['space']} "
                      f"space; course_lib.metrics.memorisation)."]
    lines += ["", "Quality against steps: " + ("this run kept no intermediate weights (its curve of FID against "
              "steps was not recorded); FID against minutes of training from scratch, per recipe, is in "
              "results/recipes_tiny_sd.json (`python scripts/study_recipes.py --base tiny_sd`)."
              if not t2.get("curve") else "see the record's curve.")]
    lines += ["", "The mini CLIP that judges text fidelity is also the text encoder the U-Net was trained to follow, "
                  "so generated images can score above real ones: read the text-fidelity columns as agreement with "
                  "the conditioning, not as an independent judgement."]
    lines += ["", f"![held-out emoji (left of each pair) and the model's image for its caption]"
                  f"({NAMES['t2i']}_samples.png)", "",
              "Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""]
    ckpt.write_text_atomic(out_dir / f"{NAMES['t2i']}.md", "\n".join(lines))
    print("wrote the model cards", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=STAGES + ("all",))
    p.add_argument("--quick", action="store_true", help="a few steps on a few images: checks the code path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=str(ROOT / "checkpoints"))
    p.add_argument("--run-dir", default=str(ROOT / "runs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="per stage; run again to continue")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--init-from", default=None, help="a folder of exported models to start the VAE / CLIP / U-Net from")
    p.add_argument("--vae-preset", default="f4c4")
    p.add_argument("--vae-steps", type=int, default=6000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=4e-4)
    p.add_argument("--kl-weight", type=float, default=DEFAULT_KL_WEIGHT)
    p.add_argument("--vae-warmup", type=int, default=0, help="steps of warm-up (use some with --init-from)")
    p.add_argument("--vae-part", default="all", choices=VAE_PARTS,
                   help="decoder: fine-tune a trained VAE's decoder alone (--init-from; the latent space unchanged)")
    p.add_argument("--vae-decay", default="constant", choices=DECAYS, help="the rate after warm-up")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="> 0: train the VAE with the perceptual term (course_lib.vae_gan; SD's autoencoder: 1)")
    p.add_argument("--adversarial-weight", type=float, default=0.0,
                   help="> 0: and with a patch discriminator (SD's autoencoder: 0.5)")
    p.add_argument("--adversarial-start", type=int, default=0, help="the step the adversarial term starts")
    p.add_argument("--d-lr", type=float, default=None, help="the discriminator's learning rate (default: --vae-lr)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between points of the quality curve")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-presets", default="f2c4,f4c4,f8c8")
    p.add_argument("--sweep-steps", type=int, default=2000)
    p.add_argument("--clip-preset", default="small")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--clip-steps", type=int, default=4000)
    p.add_argument("--clip-batch", type=int, default=256)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--clip-twemoji", action="store_true",
                   help="train the CLIP on the Twemoji drawings of the training emoji as well (same captions)")
    p.add_argument("--unet-preset", default="sd_small")
    p.add_argument("--t2i-steps", type=int, default=20000)
    p.add_argument("--t2i-batch", type=int, default=128)
    p.add_argument("--t2i-lr", type=float, default=3e-4)
    p.add_argument("--schedule", default="scaled_linear")
    p.add_argument("--prediction", default="epsilon")
    p.add_argument("--objective", default="diffusion", choices=OBJECTIVES,
                   help="flow: rectified flow's velocity (a tiny SD 3; --schedule and --prediction unused)")
    p.add_argument("--timestep-sampling", default="uniform", choices=TIMESTEP_SAMPLING,
                   help="with --objective flow: SD 3's logit-normal t, or uniform")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--guidance", default="1,2,4,7")
    p.add_argument("--eval-steps", type=int, default=30)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.vae_steps, args.clip_steps, args.t2i_steps, args.sweep_steps = 3, 3, 3, 2
        args.vae_preset, args.clip_preset, args.unet_preset = "tiny", "tiny", "sd_tiny"
        args.sweep_presets, args.eval_steps, args.guidance = "tiny", 2, "1,3"
        args.vocab_size = min(args.vocab_size, 128)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        t0 = time.perf_counter()
        {"vae": stage_vae, "clip": stage_clip, "t2i": stage_t2i, "cards": stage_cards}[stage](args, device)
        print(f"stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
