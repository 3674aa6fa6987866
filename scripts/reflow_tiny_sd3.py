"""One reflow of the shipped tiny SD 3, measured at equal network evaluations (issue 33, notebook 16).

    python scripts/reflow_tiny_sd3.py --max-minutes 60     # pairs, reflow (resumes from runs/reflow/), measure
    python scripts/reflow_tiny_sd3.py --measure-only        # measure the existing reflowed file again
    python scripts/reflow_tiny_sd3.py --quick --out-dir /tmp/reflow --run-dir /tmp/reflow/run   # seconds

1. Pairs: every training caption --pairs-per-caption times, each with its own noise (image k from seed k, the
   pipeline's start_latents), taken to its end by the teacher, checkpoints/tiny_sd3_emoji with its own sampler
   (Euler, 20 steps, guidance 1.5: pipeline.TINY_SD3_SAMPLER). Written once to runs/reflow/pairs.safetensors.
2. Reflow (course_lib.reflow.ReflowTrainer, the one loop): the teacher's weights trained on the straight lines
   between each noise and its end, uniform times, no caption dropout (it is sampled unguided: the teacher's
   guidance is in the ends), the EMA exported to --out-dir/tiny_sd3_reflow.safetensors (not shipped by default).
3. Measured on the first --n held-out captions (image k from seed k) at equal evaluations: the reflowed model with
   Euler at 1, 2, 4 and 8 steps (one evaluation each), the teacher with Euler at 1, 2, 4, 8 and 20 steps at its
   guidance (two evaluations a step) and unguided (one); FID, precision, recall against the held-out emoji beside
   the caption-matched floor, the independent judge's top-1, chroma, seconds per image; and the straightness of
   both ODEs (course_lib.flow.straightness, 0 for straight paths) on 64 held-out captions. Every cost is counted:
   the pairs' generation and the training, in CPU seconds. A grid of samples goes beside the card and the record
   (notebook 16 shows it).

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

from course_lib import checkpoint as ckpt, metrics  # noqa: E402
from course_lib.clip import load_clip  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.flow import straightness  # noqa: E402
from course_lib.pipeline import SHIPPED, TINY_SD3_SAMPLER, SamplerSettings, TextToImage, guided  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.reflow import ReflowTrainer, load_pairs, save_pairs, teacher_pairs  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.train import TrainConfig  # noqa: E402
from course_lib.unet_file import load_model  # noqa: E402
from bench_tiny_sd3 import judged  # noqa: E402
from shipping import add_arguments, refuse_to_replace, write_record_and_card  # noqa: E402
from train_tiny_sd import conditioning_for  # noqa: E402

NAME = "tiny_sd3_reflow"
TEACHER = "tiny_sd3"          # TextToImage.from_shipped's name


def command() -> str:
    return " ".join(["python", "scripts/reflow_tiny_sd3.py"] + sys.argv[1:])


def make_pairs(args, teacher: TextToImage) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    path = Path(args.run_dir) / "pairs.safetensors"
    if path.is_file():
        ends, noise, captions = load_pairs(path)
        info = json.loads((Path(args.run_dir) / "pairs.json").read_text())
        print(f"pairs: {len(ends)} read from {path}", flush=True)
        return ends, noise, captions, info
    train = load_emoji(size=32, split="train", limit=args.train_images)
    captions = [c for c in train.captions for _ in range(args.pairs_per_caption)]
    t0 = time.perf_counter()
    ends, noise = teacher_pairs(teacher, captions, teacher.sampler_settings, seed=args.seed + 10_000)
    info = {"pairs": len(captions), "per_caption": args.pairs_per_caption, "seconds": time.perf_counter() - t0,
            "teacher_sampler": teacher.sampler_settings.sampler, "teacher_steps": teacher.sampler_settings.steps,
            "teacher_guidance": teacher.sampler_settings.guidance_scale, "seed": args.seed + 10_000}
    save_pairs(path, ends, noise, captions)
    ckpt.write_text_atomic(Path(args.run_dir) / "pairs.json", json.dumps(info, indent=1))
    print(f"pairs: {len(ends)} made in {info['seconds']:.0f} s -> {path}", flush=True)
    return ends, noise, captions, info


def train(args, out: Path) -> None:
    refuse_to_replace(out, args.replace)
    teacher = TextToImage.from_shipped(model=TEACHER, device=args.device)
    ends, noise, captions, pair_info = make_pairs(args, teacher)
    cond = conditioning_for(teacher.clip, teacher.tokenizer, captions, torch.device("cpu"))
    config = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup, ema_decay=args.ema,
                         latents=True, caption_dropout=0.0, objective="flow", timestep_sampling="uniform",
                         seed=args.seed)
    state = Path(args.run_dir) / f"{NAME}.train.safetensors"
    if state.exists():
        trainer = ReflowTrainer.resume(state, ends, device=args.device, steps=args.steps, conditioning=cond,
                                       config=config, noise=noise)
        print(f"resumed at step {trainer.step} of {args.steps}", flush=True)
    else:
        model = load_model(ckpt.shipped("tiny_sd3_emoji"))[0].requires_grad_(True)
        trainer = ReflowTrainer(model, ends, config, device=args.device, conditioning=cond, noise=noise)
    trainer.train(checkpoint_path=state, checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                  max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    info = {"machine": describe_machine(args.device), "command": command(), "teacher": "tiny_sd3_emoji",
            "pairs": pair_info, "vae": SHIPPED["vae"], "clip": SHIPPED["clip"]}
    trainer.export(out, info=info, overwrite=True)
    print(f"reflow: {trainer.step} steps in {trainer.seconds:.0f} s -> {out}", flush=True)


def guided_velocity(pipe: TextToImage, captions: list[str], scale: float):
    """The pipeline's ODE velocity v(x, t) for these captions at guidance `scale` (course_lib.flow's convention)."""
    model = guided(pipe.unet, pipe.encode, captions, [""] * len(captions),
                   SamplerSettings(sampler="euler", guidance_scale=scale))
    return lambda x, t: model(x, pipe.schedule.model_times(t)).float()


def evaluate(args, out: Path) -> dict:
    teacher = TextToImage.from_shipped(model=TEACHER, device=args.device)
    student = TextToImage.from_files(out, ckpt.shipped(SHIPPED["clip"]), ckpt.shipped(SHIPPED["vae"]),
                                     device=args.device, sampler_settings=SamplerSettings(sampler="euler",
                                                                                          guidance_scale=1.0))
    info = load_model(out)[2]
    held = load_emoji(size=32, split="heldout")
    captions, subs = held.captions[:args.n], held.subcategories[:args.n]
    judge, tokenizer, _ = load_clip(ckpt.shipped("clip_judge"))
    floor = metrics.floor(match=subs)
    w = TINY_SD3_SAMPLER.guidance_scale
    record = {"command": command(), "machine": describe_machine(args.device), "torch": torch.__version__,
              "n": args.n, "teacher_guidance": w,
              "model": {k: info.get(k) for k in ("steps", "train_seconds", "machine", "command", "pairs",
                                                 "train_config")},
              "floor": {"fid": floor.fid, "precision": floor.precision, "recall": floor.recall},
              "real_chroma": metrics.colour(held.images[:args.n]).chroma, "rows": []}
    grids = {}

    def row(name, pipe, steps, scale):
        t0 = time.perf_counter()
        images = pipe.generate(captions, seed=args.seed, steps=steps, guidance_scale=scale, sampler="euler")
        seconds = (time.perf_counter() - t0) / len(captions)
        q = metrics.evaluate(images, with_floor=False)
        evals = steps * (1 if scale == 1 else 2)
        record["rows"].append({"model": name, "guidance": scale, "steps": steps, "evaluations": evals,
                               "fid": q.fid, "precision": q.precision, "recall": q.recall,
                               **judged(judge, tokenizer, images, captions),
                               "chroma": metrics.colour(images).chroma, "seconds_per_image": seconds})
        grids[(name, scale, steps)] = images[:16]
        print(f"  {name:8s} guidance {scale:g}, {steps:2d} Euler steps, {evals:2d} evaluations: FID {q.fid:.2f}, "
              f"judge top-1 {record['rows'][-1]['judge_top1']:.3f}", flush=True)

    for steps in sorted(set(args.few) | {args.teacher_steps}):
        row("teacher", teacher, steps, w)
    for steps in args.few:
        row("teacher", teacher, steps, 1.0)
        row("reflow", student, steps, 1.0)
    k = min(64, args.n)
    noise = torch.randn((k, *teacher.latent_shape), generator=torch.Generator().manual_seed(args.seed))
    record["straightness"] = {
        "captions": k, "steps": args.straight_steps,
        "teacher_guided": straightness(guided_velocity(teacher, captions[:k], w), noise, args.straight_steps),
        "teacher_unguided": straightness(guided_velocity(teacher, captions[:k], 1.0), noise, args.straight_steps),
        "reflow": straightness(guided_velocity(student, captions[:k], 1.0), noise, args.straight_steps)}
    print("straightness (0: straight): " + ", ".join(f"{key} {v:.4f}" for key, v in record["straightness"].items()
                                                   if key.startswith(("teacher", "reflow"))), flush=True)
    rows = [held.images[:min(16, args.n)], grids[("teacher", w, args.teacher_steps)], grids[("teacher", w, 1)],
            grids[("reflow", 1.0, 1)], grids[("reflow", 1.0, 2)], grids[("reflow", 1.0, 4)]]
    for folder in (Path(args.out_dir), Path(args.record).parent):    # beside the card, and beside the record
        save_grid_png(torch.cat(rows), folder / f"{NAME}_samples.png", columns=len(rows[0]))
    record["verdicts"] = verdicts(record)
    for v in record["verdicts"]:
        print(v["text"], flush=True)
    return record


def verdicts(record: dict) -> list[dict]:
    """At each evaluation count: which of the three is lowest in FID (the teacher guided exists at even counts)."""
    out = []
    for evals in sorted({r["evaluations"] for r in record["rows"] if r["model"] == "reflow"}):
        at = [r for r in record["rows"] if r["evaluations"] == evals]
        best = min(at, key=lambda r: r["fid"])
        text = (f"at {evals} evaluation(s): lowest FID {best['fid']:.2f} by the {best['model']} (guidance "
                f"{best['guidance']:g}); " + ", ".join(f"{r['model']} w={r['guidance']:g} {r['fid']:.2f}" for r in at))
        out.append({"evaluations": evals, "best": best["model"], "best_guidance": best["guidance"],
                    "fid": {f"{r['model']} w={r['guidance']:g}": r["fid"] for r in at}, "text": text})
    return out


def card(record: dict) -> str:
    m, f, s = record["model"], record["floor"], record["straightness"]
    pairs, cfg = m["pairs"], m["train_config"]
    table = ["| model | guidance | Euler steps | evaluations | FID | precision | recall | judge top-1 | chroma | "
             "s/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['guidance']:g} | {r['steps']} | {r['evaluations']} | {r['fid']:.2f} | "
              f"{r['precision']:.2f} | {r['recall']:.2f} | {r['judge_top1']:.3f} | {r['chroma']:.3f} | "
              f"{r['seconds_per_image']:.3f} |" for r in sorted(record["rows"], key=lambda r: (r["evaluations"],
                                                                                               r["model"]))]
    table.append(f"| real training emoji, caption-matched (the floor) | | | | {f['fid']:.2f} | {f['precision']:.2f} | "
                 f"{f['recall']:.2f} | | {record['real_chroma']:.3f} (held out) | |")
    hours = (pairs["seconds"] + (m.get("train_seconds") or 0)) / 3600
    return "\n".join([
        f"# {NAME}: one reflow of the tiny SD 3", "",
        f"checkpoints/tiny_sd3_emoji (the teacher, an MMDiT with rectified flow) trained again on "
        f"{pairs['pairs']:,} of its own (noise, image) pairs ({pairs['per_caption']} noise(s) for each training "
        f"caption, taken to their ends by its {pairs['teacher_sampler']} sampler, {pairs['teacher_steps']} steps, "
        f"guidance {pairs['teacher_guidance']:g}): course_lib.reflow.ReflowTrainer, uniform times, no caption "
        f"dropout, {m['steps']:,} steps of {cfg['batch_size']} at lr {cfg['lr']:g}, EMA {cfg['ema_decay']}; sampled "
        f"unguided. Cost: the pairs {pairs['seconds'] / 3600:.2f} CPU-hours, the training "
        f"{(m.get('train_seconds') or 0) / 3600:.2f}, {hours:.2f} in all, on {m['machine']}.", "",
        f"Command: `{m['command']}`; measured by `{record['command']}` on {record['machine']}, torch "
        f"{record['torch']}.", "",
        f"Measured on the first {record['n']} held-out captions (image k from seed k); a guided step costs two "
        f"evaluations:", "", *table, "",
        *[f"- {v['text']}" for v in record["verdicts"]], "",
        f"Straightness of the ODE paths (course_lib.flow.straightness over {s['steps']} Euler steps, {s['captions']} "
        f"held-out captions; 0 for straight paths): the teacher guided {s['teacher_guided']:.4f}, unguided "
        f"{s['teacher_unguided']:.4f}; the reflowed model {s['reflow']:.4f}.", "",
        "The judge (checkpoints/clip_judge) never conditioned either model.", "",
        f"![rows: held-out emoji; the teacher at 20 guided steps; the teacher, 1 guided step; the reflowed model at "
        f"1, 2 and 4 steps]({NAME}_samples.png)", "",
        "Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, steps=100_000, run_dir=str(ROOT / "runs" / "reflow"),
                  record=str(ROOT / "results" / f"{NAME}.json"))
    p.set_defaults(out_dir=str(ROOT / "runs" / "reflow"))
    p.add_argument("--pairs-per-caption", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--straight-steps", type=int, default=32)
    args = p.parse_args(argv)
    args.few = [1, 2, 4, 8]
    if args.quick:
        args.steps, args.train_images, args.n, args.pairs_per_caption, args.teacher_steps = 3, 8, 8, 1, 4
        args.straight_steps = 4
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir) / f"{NAME}.safetensors"
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    if not args.measure_only:
        train(args, out)
    record = evaluate(args, out)
    write_record_and_card(Path(args.record), Path(args.out_dir) / f"{NAME}.md", record, card(record))


if __name__ == "__main__":
    main()
