"""Distil and measure the course's LCM-LoRA: a few-step adapter for the shipped tiny SD (notebook 16).

    python scripts/train_lcm_lora.py --max-minutes 120       # distil (resumes from runs/lcm_lora/), export, measure
    python scripts/train_lcm_lora.py --measure-only          # measure the shipped file again, rewrite card and record
    python scripts/train_lcm_lora.py --quick --out-dir /tmp/lcm   # seconds: the same code on a few images
    python scripts/train_lcm_lora.py --student full --max-minutes 120   # LCM: a full student (runs/lcm_full/)

Latent consistency distillation as LCM-LoRA (course_lib.lcm.distill_lcm_lora: rank-8 adapters on the U-Net's
attention projections, the teacher the same U-Net with its adapters off, guided at the tiny SD's own scale, no EMA
target), on the 3,388 training emoji and captions, through the course's one loop, checkpointed under --run-dir.

It writes checkpoints/lcm_lora_tiny_sd.safetensors (course_lib.lora.save_lora), its card and
results/lcm_lora_tiny_sd.json. Measured at equal network evaluations on the first --n held-out captions (image k
from seed k): the student with the "lcm" sampler at 1, 2, 4 and 8 steps (one evaluation a step: no guidance), the
teacher with DDIM and with DPM-Solver++(2M) at 1, 2, 4, 8 and 20 steps (two evaluations a step: guidance), and the
teacher at 1 unguided DDIM step; FID, precision and recall against the held-out emoji beside the caption-matched
floor, the independent judge's top-1, seconds per image. The targets (issue 33): the student at 4 evaluations within
1.3x the teacher's best FID, at 1 evaluation within 2x; the verdict is printed and recorded.
With --student full the same script distils LCM itself (course_lib.lcm.distill_lcm: a full copy of the U-Net,
its EMA copy as the target, mu = 0.95) and measures it the same way; the student (3.4 M numbers) is not shipped
(the repository has no room for it): it is written to runs/lcm_full/lcm_tiny_sd.safetensors with its card, and its
record to results/lcm_tiny_sd.json.
A finished model is not replaced silently: with the output file present, training refuses unless --replace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from course_lib import checkpoint as ckpt, metrics  # noqa: E402
from course_lib.clip import load_clip, retrieval_accuracy, similarity  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.lcm import LCMConfig, distill_lcm, distill_lcm_lora  # noqa: E402
from course_lib.loop import DECAYS  # noqa: E402
from course_lib.lora import load_lora, lora_scale, save_lora  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.unet_file import load_model, save_model  # noqa: E402
from shipping import add_arguments, refuse_to_replace, write_record_and_card  # noqa: E402

NAME = "lcm_lora_tiny_sd"
NAMES = {"lora": NAME, "full": "lcm_tiny_sd"}
TARGETS = {4: 1.3, 1: 2.0}          # evaluations: the largest allowed ratio to the teacher's best FID


def command() -> str:
    return " ".join(["python", "scripts/train_lcm_lora.py"] + sys.argv[1:])


def train(args, out: Path) -> None:
    refuse_to_replace(out, args.replace)
    pipe = TextToImage.from_shipped(device=args.device)
    data = load_emoji(size=32, split="train", limit=args.train_images)
    full = args.student == "full"
    config = LCMConfig(guidance=pipe.sampler_settings.guidance_scale, target_ema=0.95 if full else None)
    common = dict(config=config, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                  checkpoint_path=Path(args.run_dir) / f"{NAMES[args.student]}.train.safetensors",
                  checkpoint_every=200, max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                  progress=not args.no_progress)
    if full:
        student, log = distill_lcm(pipe, data.images, data.captions, lr_decay=args.lr_decay, **common)
    else:
        log = distill_lcm_lora(pipe, data.images, data.captions, rank=args.rank, lr_decay=args.lr_decay, **common)
    info = {"student": args.student, "steps": log.steps, "train_seconds": round(log.seconds, 1), "batch": args.batch,
            "lr": args.lr, "lr_decay": args.lr_decay, "trainable": log.trainable, "train_images": len(data.captions),
            "lcm": json.loads(config.to_json()), "machine": describe_machine(args.device), "command": command(),
            "teacher": "tiny_sd_emoji", **({} if full else {"rank": args.rank})}
    if log.steps < args.steps:
        print(f"stopped at step {log.steps} of {args.steps} (--max-minutes); run again to go on", flush=True)
    if full:
        save_model(out, student.unet, schedule=pipe.schedule, prediction=pipe.prediction, info=info)
    else:
        save_lora(out, pipe.unet, info=info)
    print(f"{'LCM' if full else 'LCM-LoRA'}: {log.steps} steps in {log.seconds:.0f} s -> {out}", flush=True)


def evaluate(args, out: Path) -> dict:
    pipe = TextToImage.from_shipped(device=args.device)
    if args.student == "full":
        student = TextToImage.from_files(out, ckpt.shipped(SHIPPED["clip"]), ckpt.shipped(SHIPPED["vae"]),
                                         device=args.device)
        info = load_model(out)[2]
    else:
        info = load_lora(out, pipe.unet)["info"]
        student = pipe                                     # its adapters on (scale 1); the teacher: scale 0
    config = LCMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["lcm"].items()})
    held = load_emoji(size=32, split="heldout")
    captions, subs = held.captions[:args.n], held.subcategories[:args.n]
    judge, tokenizer, _ = load_clip(ckpt.shipped("clip_judge"))
    floor = metrics.floor(match=subs)
    record = {"command": command(), "machine": describe_machine(args.device), "torch": torch.__version__,
              "n": args.n, "model": info, "floor": {"fid": floor.fid, "precision": floor.precision,
                                                    "recall": floor.recall},
              "real_chroma": metrics.colour(held.images[:args.n]).chroma, "rows": []}
    grids = {}

    def row(name, sampler, steps, evals, run):
        t0 = time.perf_counter()
        images = run()
        seconds = (time.perf_counter() - t0) / len(captions)
        q = metrics.evaluate(images, with_floor=False)
        top1 = retrieval_accuracy(similarity(judge, tokenizer, images, captions), ks=(1,))[1]
        record["rows"].append({"model": name, "sampler": sampler, "steps": steps, "evaluations": evals,
                               "fid": q.fid, "precision": q.precision, "recall": q.recall, "judge_top1": top1,
                               "chroma": metrics.colour(images).chroma, "seconds_per_image": seconds})
        grids[(name, sampler, steps)] = images[:16]
        print(f"  {name:8s} {sampler:8s} {steps:2d} steps, {evals:2d} evaluations: FID {q.fid:.2f}, "
              f"judge top-1 {top1:.3f}", flush=True)

    with lora_scale(pipe.unet, 0.0) if student is pipe else contextlib.nullcontext():    # the teacher
        for sampler in ("ddim", "dpm++2m"):
            for steps in sorted(set(args.few) | {args.teacher_steps}):
                row("teacher", sampler, steps, 2 * steps,
                    lambda: pipe.generate(captions, seed=args.seed, steps=steps, sampler=sampler))
        row("teacher", "ddim w=1", 1, 1, lambda: pipe.generate(captions, seed=args.seed, steps=1, guidance_scale=1.0))
    for steps in args.few:
        row("student", "lcm", steps, steps, lambda: student.generate(captions, seed=args.seed,
                                                                     settings=config.sampler(steps)))
    teacher = [r for r in record["rows"] if r["model"] == "teacher"]
    best = min(teacher, key=lambda r: r["fid"])
    record["verdicts"] = []
    for evals, within in TARGETS.items():
        s = next(r for r in record["rows"] if r["model"] == "student" and r["evaluations"] == evals)
        ratio = s["fid"] / best["fid"]
        record["verdicts"].append({"evaluations": evals, "student_fid": s["fid"], "teacher_best_fid": best["fid"],
                                   "teacher_best": f"{best['sampler']}, {best['steps']} steps", "ratio": ratio,
                                   "target": within, "met": ratio <= within})
        print(f"student at {evals} evaluation(s): FID {s['fid']:.2f} = {ratio:.2f}x the teacher's best "
              f"({best['fid']:.2f}, {best['sampler']} {best['steps']} steps); target {within}x: "
              f"{'met' if ratio <= within else 'not met'}", flush=True)
    rows = [held.images[:16], grids[("teacher", "ddim", args.teacher_steps)], grids[("teacher", "ddim", 4)],
            grids[("student", "lcm", 4)], grids[("student", "lcm", 1)]]
    save_grid_png(torch.cat(rows), Path(args.out_dir) / f"{NAMES[args.student]}_samples.png", columns=16)
    return record


def card(record: dict) -> str:
    m = record["model"]
    table = ["| model | sampler | steps | evaluations | FID | precision | recall | judge top-1 | chroma | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    chroma = lambda r: f"{r['chroma']:.3f}" if "chroma" in r else "n/a"  # noqa: E731
    table += [f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['evaluations']} | {r['fid']:.2f} | "
              f"{r['precision']:.2f} | {r['recall']:.2f} | {r['judge_top1']:.3f} | {chroma(r)} | "
              f"{r['seconds_per_image']:.3f} |" for r in sorted(record["rows"], key=lambda r: (r["evaluations"], r["model"]))]
    f = record["floor"]
    table.append(f"| real training emoji, caption-matched (the floor) | | | | {f['fid']:.2f} | {f['precision']:.2f} | "
                 f"{f['recall']:.2f} | | {record['real_chroma']:.3f} (held out) | |" if "real_chroma" in record else
                 f"| real training emoji, caption-matched (the floor) | | | | {f['fid']:.2f} | {f['precision']:.2f} | "
                 f"{f['recall']:.2f} | | | |")
    verdicts = [f"- at {v['evaluations']} evaluation(s): FID {v['student_fid']:.2f}, {v['ratio']:.2f}x the teacher's "
                f"best ({v['teacher_best_fid']:.2f}, {v['teacher_best']}); target within {v['target']}x: "
                f"{'met' if v['met'] else 'not met'}" for v in record["verdicts"]]
    name = NAMES[m.get("student", "lora")]
    decay = " decaying by a cosine to 0" if m.get("lr_decay") == "cosine" else ""
    if m.get("student") == "full":
        head = [f"# {name}: a latent consistency model (LCM) distilled from the tiny SD", "",
                f"A full copy of tiny_sd_emoji's U-Net ({m['trainable']:,} numbers) distilled by latent consistency "
                f"distillation (course_lib.lcm.distill_lcm: the teacher guided at w = {m['lcm']['guidance'][0]:g}, "
                f"one DDIM step of its ODE per example on LCM's {m['lcm']['distilled_steps']}-point skipping grid, "
                f"Huber loss, the target an EMA of the student with mu = {m['lcm']['target_ema']:g}) on "
                f"{m['train_images']:,} training emoji: {m['steps']:,} steps of {m['batch']} at lr {m['lr']:g}{decay} in "
                f"{m['train_seconds'] / 3600:.2f} CPU-hours on {m['machine']}.", "",
                "Not shipped (the repository has no room for a second 3.4 M-parameter U-Net). Load: "
                "`TextToImage.from_files(path, clip, vae)`, sample with `pipe(prompt, settings=LCMConfig(...)"
                ".sampler(4))` (the \"lcm\" sampler, no guidance).", ""]
    else:
        head = [f"# {name}: LCM-LoRA, a few-step adapter for the tiny SD", "",
                f"Rank-{m['rank']} LoRA adapters ({m['trainable']:,} numbers) on tiny_sd_emoji's attention "
                f"projections, distilled by latent consistency distillation (course_lib.lcm.distill_lcm_lora: the "
                f"teacher is the same U-Net with its adapters off, guided at w = {m['lcm']['guidance'][0]:g}, one "
                f"DDIM step of its ODE per example on LCM's {m['lcm']['distilled_steps']}-point skipping grid, Huber "
                f"loss, no EMA target) on {m['train_images']:,} training emoji: {m['steps']:,} steps of "
                f"{m['batch']} at lr {m['lr']:g}{decay} in {m['train_seconds'] / 3600:.2f} CPU-hours on {m['machine']}.", "",
                "Load: `course_lib.lora.load_lora(path, pipe.unet)` on `TextToImage.from_shipped()`, then sample "
                "with `pipe(prompt, settings=LCMConfig(...).sampler(4))` (the \"lcm\" sampler, no guidance); "
                "`lora.lora_scale(pipe.unet, 0)` switches it off.", ""]
    return "\n".join([
        *head,
        f"Command: `{m['command']}`; measured by `{record['command']}` on {record['machine']}, torch "
        f"{record['torch']}.", "",
        f"Measured at equal network evaluations on the first {record['n']} held-out captions (image k from seed k); "
        f"the teacher's guided steps cost two evaluations each:", "", *table, "",
        "The targets (student against the teacher's best FID in the table):", *verdicts, "",
        "The judge (checkpoints/clip_judge) never conditioned either model.", "",
        f"![rows: held-out emoji; the teacher, DDIM 20 steps (40 evaluations); the teacher, DDIM 4 steps (8); "
        f"the student, 4 steps (4); the student, 1 step (1)]({name}_samples.png)", "",
        "Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, steps=20000, run_dir=None, record=None, record_help="default results/<name>.json")
    p.add_argument("--student", choices=tuple(NAMES), default="lora",
                   help="lora: LCM-LoRA (shipped); full: LCM, a full copy of the U-Net (runs/lcm_full/)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 for LCM-LoRA, 1e-4 for the full student")
    p.add_argument("--lr-decay", choices=DECAYS, default="constant",
                   help="the learning rate: constant, or a cosine from --lr down to 0 at --steps")
    p.add_argument("--teacher-steps", type=int, default=20, help="the teacher's most steps (its default sampler's)")
    p.set_defaults(out_dir=None)
    args = p.parse_args(argv)
    name, full = NAMES[args.student], args.student == "full"
    args.lr = args.lr if args.lr is not None else (1e-4 if full else 1e-3)
    args.run_dir = args.run_dir or str(ROOT / "runs" / ("lcm_full" if full else "lcm_lora"))
    args.out_dir = args.out_dir or str(ROOT / ("runs/lcm_full" if full else "checkpoints"))
    args.record = args.record or str(ROOT / "results" / f"{name}.json")
    args.few = [1, 2, 4, 8]
    if args.quick:
        args.steps, args.train_images, args.n, args.batch, args.teacher_steps = 3, 16, 8, 4, 8
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir) / f"{name}.safetensors"
    if not args.measure_only:
        train(args, out)
    record = evaluate(args, out)
    write_record_and_card(Path(args.record), Path(args.out_dir) / f"{name}.md", record, card(record))


if __name__ == "__main__":
    main()
