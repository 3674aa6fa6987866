"""Train the course's tiny Stable Diffusion 3: an MMDiT (course_lib.mmdit) with rectified flow on the tiny SD's latents.

    python scripts/train_tiny_sd3.py --max-minutes 90      # train (resumes from runs/tiny_sd3/), export, measure
    python scripts/train_tiny_sd3.py --measure-only         # measure the shipped file again, rewrite card and record
    python scripts/train_tiny_sd3.py --quick --out-dir /tmp/sd3   # seconds: the same code on a few images

Why this backbone and size: scripts/bench_backbones.py trained the U-Net and the MMDiT at two sizes each for the same
training FLOPs (results/backbones.json) and the smallest MMDiT, mmdit_tiny, had the lowest FID. This script trains
that model for longer with the bench's recipe (the same data, objective, batch, learning rate, warm-up, EMA and
caption dropout: `bench_backbones.train_config`), on the shipped VAE's latents of every training emoji and the
shipped mini CLIP's text states of their captions, exactly as the shipped tiny SD (a U-Net) was trained.

It writes checkpoints/tiny_sd3_emoji.safetensors (EMA weights; TextToImage.from_shipped("tiny_sd3") loads it),
its card checkpoints/tiny_sd3_emoji.md with a grid of samples, and results/tiny_sd3_emoji.json: FID, KID,
precision and recall against the 398 held-out emoji at 4, 8 and 20 Euler steps and a guidance sweep, beside the
caption-matched floor and the VAE ceiling, the independent judge's top-1, and the shipped tiny SD (U-Net) measured
on the same captions with the same seeds (bench_backbones.measure and references).

A finished model is not replaced silently: with the output file present, training refuses unless --replace.
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench_backbones import build, load_data, measure, references, train_config  # noqa: E402
from bench_tiny_sd3 import judged  # noqa: E402
from shipping import add_arguments, refuse_to_replace, write_record_and_card  # noqa: E402
from course_lib import metrics  # noqa: E402
from course_lib import checkpoint as ckpt  # noqa: E402
from course_lib.clip import load_clip  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.train import Trainer  # noqa: E402
from course_lib.unet import count_parameters  # noqa: E402

NAME = "tiny_sd3_emoji"
MODEL = "mmdit_tiny"          # a name of bench_backbones.MODELS


def command() -> str:
    return " ".join(["python", "scripts/train_tiny_sd3.py"] + sys.argv[1:])


def train(args, data: dict) -> Path:
    out = Path(args.out_dir) / f"{NAME}.safetensors"
    refuse_to_replace(out, args.replace)
    config = train_config(args, MODEL, args.steps)
    state = Path(args.run_dir) / f"{NAME}.train.safetensors"
    if state.exists():
        trainer = Trainer.resume(state, data["latents"], device=args.device, steps=args.steps,
                                 conditioning=data["cond"], config=config)
        print(f"resumed at step {trainer.step} of {args.steps}", flush=True)
    else:
        torch.manual_seed(args.seed)
        trainer = Trainer(build(MODEL, data["width"]), data["latents"], config, device=args.device,
                          conditioning=data["cond"])
    trainer.train(checkpoint_path=state, checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                  max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    info = {"machine": describe_machine(args.device), "command": command(), "model": MODEL,
            "vae": SHIPPED["vae"], "clip": SHIPPED["clip"], "params": count_parameters(trainer.model),
            "recipe": "scripts/bench_backbones.py train_config (rectified flow, logit-normal t)"}
    path = trainer.export(out, info=info, overwrite=True)
    print(f"{MODEL}: {trainer.step} steps in {trainer.seconds:.0f} s -> {path}", flush=True)
    return path


def evaluate(args, data: dict) -> dict:
    """Both shipped text-to-image models on the same captions and seeds, with the floor and the VAE ceiling."""
    judge = load_clip(ckpt.shipped("clip_judge"))[:2]
    captions = data["held"].captions[:args.n]
    sd3 = TextToImage.from_files(Path(args.out_dir) / f"{NAME}.safetensors", ckpt.shipped(SHIPPED["clip"]),
                                 ckpt.shipped(SHIPPED["vae"]), device=args.device)
    info = json.loads(ckpt.read(Path(args.out_dir) / f"{NAME}.safetensors")[1]["info"])
    record = {"command": command(), "machine": describe_machine(args.device), "torch": torch.__version__,
              "n": args.n, "guidance": args.guidance, "sample_steps": args.sample_steps,
              "model": {k: info.get(k) for k in ("steps", "train_seconds", "machine", "params", "model", "command")},
              "references": references(data, args, judge)}
    print(f"tiny SD 3 ({MODEL}), guidance {args.guidance}:", flush=True)
    record["tiny_sd3"], record["tiny_sd3_seed_check"] = measure(sd3, captions, args, judge)
    sweep = argparse.Namespace(**{**vars(args), "sample_steps": [max(args.sample_steps)]})
    record["guidance_sweep"] = {}
    for g in args.sweep:
        sweep.guidance = g
        print(f"tiny SD 3, guidance {g}:", flush=True)
        record["guidance_sweep"][str(g)] = measure(sd3, captions, sweep, judge)[0][0]
    unet = TextToImage.from_shipped(device=args.device)
    print("the shipped tiny SD (U-Net, DDIM, its own guidance) on the same captions:", flush=True)
    record["tiny_sd"] = []
    for steps in args.sample_steps:
        t0 = time.perf_counter()
        images = unet.generate(captions, seed=args.seed, steps=steps)
        q = metrics.evaluate(images, with_floor=False)
        record["tiny_sd"].append({"sample_steps": steps, "fid": q.fid, "precision": q.precision, "recall": q.recall,
                                  **judged(judge[0], judge[1], images, captions),
                                  "seconds_per_image": (time.perf_counter() - t0) / len(captions)})
        print(f"  DDIM {steps:3d} steps: FID {q.fid:.2f}", flush=True)
    grid = sd3.generate(captions[:32], seed=args.seed, steps=max(args.sample_steps), guidance_scale=args.guidance)
    pairs = torch.stack([data["held"].images[:32], grid], 1).reshape(-1, *grid.shape[1:])
    save_grid_png(pairs, Path(args.out_dir) / f"{NAME}_samples.png", columns=16)
    return record


def card(record: dict) -> str:
    m, ref = record["model"], record["references"]
    row = lambda r: (f"| {r['sample_steps']} | {r['fid']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "  # noqa: E731
                     f"{r['judge_top1']:.3f} | {r['seconds_per_image']:.3f} |")
    hours = (m.get("train_seconds") or 0) / 3600
    lines = [f"# {NAME}: the tiny Stable Diffusion 3 (an MMDiT with rectified flow)", "",
             f"An MMDiT ({MODEL} of scripts/bench_backbones.py, {m.get('params'):,} parameters: two streams, joint "
             f"attention, adaLN from the timestep and the pooled text, QK-norm; course_lib.mmdit) trained with "
             f"rectified flow and logit-normal timesteps on the latents of {SHIPPED['vae']} and the text states of "
             f"{SHIPPED['clip']}: the same data and text encoder as the tiny SD (tiny_sd_emoji, a U-Net).", "",
             f"Trained: {m.get('steps'):,} steps of 64 in {hours:.2f} CPU-hours on {m.get('machine')}.", "",
             f"Command: `{m.get('command') or record['command']}`; measured by `{record['command']}` on "
             f"{record['machine']}, torch {record['torch']}.", "",
             f"Measured on the first {record['n']} held-out captions, one image each (image k from seed k), Euler "
             f"sampler, guidance {record['guidance']:g}; FID in the course's feature space (course_lib.metrics):", "",
             "| Euler steps | FID | precision | recall | judge top-1 | s/image |", "|---|---|---|---|---|---|",
             *[row(r) for r in record["tiny_sd3"]], "",
             f"Beside it: the caption-matched floor (real training emoji of each caption's subcategory) FID "
             f"{ref['matched_floor']['fid']:.2f}; the VAE ceiling (those emoji through the VAE) FID "
             f"{ref['vae_ceiling']['fid']:.2f}; the real held-out images' judge top-1 "
             f"{ref['real_heldout']['judge_top1']:.3f}. Sampling noise: FID {record['tiny_sd3_seed_check']['fid'][0]:.2f}"
             f" and {record['tiny_sd3_seed_check']['fid'][1]:.2f} from two sets of seeds.", "",
             "The shipped tiny SD (U-Net, DDIM, guidance 4) on the same captions and seeds: "
             + "; ".join(f"{r['sample_steps']} steps FID {r['fid']:.2f}, judge top-1 {r['judge_top1']:.3f}"
                         for r in record["tiny_sd"]) + ".", "",
             f"Guidance at {max(record['sample_steps'])} Euler steps: "
             + "; ".join(f"{g}: FID {r['fid']:.2f}, judge top-1 {r['judge_top1']:.3f}"
                         for g, r in record["guidance_sweep"].items()) + ".", "",
             "The judge (checkpoints/clip_judge) never conditioned either model.", "",
             f"![held-out emoji (left of each pair) and the model's image for its caption]({NAME}_samples.png)", "",
             "Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, steps=200_000, run_dir=str(ROOT / "runs" / "tiny_sd3"),
                  record=str(ROOT / "results" / f"{NAME}.json"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr-unet", type=float, default=3e-4)
    p.add_argument("--lr-transformer", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--timestep-shift", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sweep", default="1.5,3,5", help="guidance scales measured at the most steps")
    p.add_argument("--sample-steps", default="4,8,20")
    p.add_argument("--checkpoint-every", type=int, default=500)
    args = p.parse_args(argv)
    args.sample_steps = sorted({int(s) for s in args.sample_steps.split(",")})
    args.sweep = [float(g) for g in args.sweep.split(",")]
    if args.quick:
        args.steps, args.train_images, args.n, args.sample_steps, args.sweep = 3, 64, 32, [2], [3.0]
    torch.set_num_threads(args.threads)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    if not args.measure_only:
        train(args, data)
    record = evaluate(args, data)
    write_record_and_card(Path(args.record), Path(args.out_dir) / f"{NAME}.md", record, card(record))


if __name__ == "__main__":
    main()
