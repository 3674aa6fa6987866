"""Train the shipped pixel-space DDPM on 32 px Noto emoji, export it, measure it, write its model card.

    python scripts/train_ddpm.py                      # train (resuming if a checkpoint exists), export, card
    python scripts/train_ddpm.py --max-minutes 60     # stop after an hour; run again later to continue
    python scripts/train_ddpm.py --card-only          # re-measure the exported model and rewrite the card
    python scripts/train_ddpm.py --objective flow --curve-every 1000   # rectified flow; FID every 1,000 steps

Training state goes to runs/ddpm_emoji32.train.safetensors (float32, with optimizer and RNG state; not
shipped). When training reaches --steps the EMA weights are exported in float16 to
checkpoints/ddpm_emoji32.safetensors and measured (FID/KID against held-out emoji, with the
real-versus-real floor, in course_lib.metrics' feature space; memorisation share), and the model card
checkpoints/ddpm_emoji32.md is written from those measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib.checkpoint import card_section, replace_card_section, write_text_atomic  # noqa: E402
from course_lib.unet_file import load_model  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.settings import describe_machine as machine  # noqa: E402
from course_lib.flow import TIMESTEP_SAMPLING  # noqa: E402
from course_lib.train import DECAYS, OBJECTIVES, TrainConfig, Trainer  # noqa: E402
from course_lib.unet import UNet, count_parameters, get_preset  # noqa: E402

NAME = "ddpm_emoji32"          # the file name; --name picks another (e.g. ddpm_emoji32_v for the v / zero-SNR model)


def measure(model_path: Path, n: int, steps: int, sampler: str, seed: int, memorised: bool = True) -> dict:
    from course_lib import metrics
    from course_lib.sampling import sample

    model, schedule, info = load_model(model_path)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    chunks = []
    for start in range(0, n, 128):
        b = min(128, n - start)
        chunks.append(sample(model, schedule, (b, 3, 32, 32), sampler=sampler, steps=steps,
                             prediction=info["prediction"], generator=gen))
    samples = torch.cat(chunks)
    seconds = time.perf_counter() - t0
    quality = metrics.evaluate(samples, reference="heldout")
    floor = metrics.floor(n=quality.n)
    memo = metrics.memorisation(samples, load_emoji(size=32, split="train").images) if memorised else None
    return {"samples": samples, "quality": quality, "floor": floor, "memorisation": memo,
            "sample_seconds": seconds, "n": n, "steps": steps, "sampler": sampler}


def chain_entry(init_from: str | Path, before: dict, run_dir: Path) -> dict:
    """What --init-from started from, for the card: that run's steps, seconds, machine and command, the runs before it
    (earlier_steps, earlier_seconds: load_model's chain totals less that run's own), and the path of a copy of its
    weights in the run folder, which stays when the file it came from is replaced by this run's result."""
    copy = run_dir / f"start_{Path(init_from).name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not copy.exists():
        tmp = copy.with_suffix(".tmp")
        shutil.copyfile(init_from, tmp)
        tmp.replace(copy)
    earlier_steps = before["steps_total"] - before["steps"]
    return {"path": str(copy), **{k: before.get(k) for k in ("steps", "train_seconds", "machine", "command")},
            **({"earlier_steps": earlier_steps,
                "earlier_seconds": round(before["train_seconds_total"] - before["train_seconds"], 1)}
               if earlier_steps else {})}


def write_card(path: Path, args, info: dict, result: dict, params: int) -> None:
    q, f, m = result["quality"], result["floor"], result["memorisation"]
    tc = info["train_config"]
    lines = [
        f"# Model card: {args.name}",
        "",
        "A pixel-space DDPM U-Net that generates 32x32 emoji in the Noto style, unconditionally.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `checkpoints/{args.name}.safetensors` (EMA weights, float16) |",
        f"| architecture | course_lib.unet preset `{args.preset}`, {params:,} parameters |",
        f"| data | Noto emoji, training split ({info['n_images']} images), 32 px |",
        (f"| objective | rectified flow: velocity prediction, {tc.get('timestep_sampling')} times |"
         if tc.get("objective") == "flow" else
         f"| objective | {tc['prediction']} prediction, {tc['schedule']} schedule"
         f"{' rescaled to zero terminal SNR' if tc.get('zero_terminal_snr') else ''}, T = {tc['T']} |"),
        f"| training | {info['steps']} steps, batch {tc['batch_size']}, AdamW lr {tc['lr']} "
        f"(warm-up {tc['warmup']}{', cosine decay to 0' if tc.get('lr_decay') == 'cosine' else ''}), "
        f"grad clip {tc['grad_clip']}, EMA {tc['ema_decay']}, seed {tc['seed']} |",
        f"| hardware | {info.get('machine', 'unknown')} |",
        f"| training time | {info['train_seconds'] / 60:.1f} min of optimisation steps (the machine was shared with "
        f"other jobs when this was measured: an upper bound) |",
        f"| command | `{info.get('command', 'python scripts/train_ddpm.py')}` |",
        *([f"| started from | the weights of an earlier run: {first['steps']} steps, {first['train_seconds']} s on "
           f"{first['machine']}, made by `{first['command']}`"
           + (f" (itself started from {first['earlier_steps']:,} steps, {first['earlier_seconds']:.0f} s, of the runs "
              f"before it)" if first.get("earlier_steps") else "")
           + f"; in all {info['steps_total']:,} steps, {info['train_seconds_total'] / 3600:.2f} CPU-hours |"]
          if (first := info.get("initialised_from")) else []),
        "",
        "## Measured quality",
        "",
        f"Measured by this script (`python scripts/train_ddpm.py{'' if args.name == NAME else ' --name ' + args.name} --card-only` "
        f"repeats it) on {machine()}, "
        f"torch {torch.__version__}:",
        f"{result['n']} samples, {result['sampler']} with {result['steps']} steps, seed {args.seed}, "
        f"{result['sample_seconds']:.1f} s to sample.",
        "FID and KID are computed in the course's own feature space (course_lib.metrics, the shipped",
        "emoji classifier `feature_net`), against the held-out emoji. The floor is the same measure between",
        "as many real training images and the held-out set: the best a model can reach at this sample count.",
        "",
        "| | FID | KID |",
        "|---|---|---|",
        f"| samples vs held-out | {q.fid:.2f} | {q.kid_mean:.3f} ± {q.kid_std:.3f} |",
        f"| floor: real train vs held-out | {f.fid:.2f} | {f.kid_mean:.3f} ± {f.kid_std:.3f} |",
        "",
        *(["## Quality against training steps", "",
            f"The same measurement ({result['n']} samples, the same seed) of the weights it started from and of these:", "",
            "| steps | CPU-hours | FID | KID | precision | recall | floor FID |", "|---:|---:|---:|---:|---:|---:|---:|"]
          + [f"| {n:,} | {sec / 3600:.2f} | {c.fid:.2f} | {c.kid_mean:.3f} ± {c.kid_std:.3f} | {c.precision:.2f} | "
             f"{c.recall:.2f} | {f.fid:.2f} |" for n, sec, c in result["curve"]] + [""] if result.get("curve") else []),
        *(["## Quality while training", "",
            f"The EMA weights measured every {info['curve'][1]['step'] - info['curve'][0]['step'] if len(info['curve']) > 1 else info['curve'][0]['step']:,} "
            f"steps of this run ({info['curve'][0]['n']} samples, {result['sampler']} {result['steps']} steps, seed "
            f"{args.seed}" + (f"; FID at this n is higher than at {result['n']}, and so is its floor"
                              if info['curve'][0]['n'] < result['n'] else "") + "):", "",
            "| steps of this run | CPU-hours of this run | FID | floor FID | FID / floor | precision | recall |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
          + [f"| {c['step']:,} | {c['train_seconds'] / 3600:.2f} | {c['fid']:.2f} | {c['floor_fid']:.2f} | "
             f"{c['fid'] / c['floor_fid']:.2f} | {c['precision']:.2f} | {c['recall']:.2f} |" for c in info["curve"]]
          + [""] if info.get("curve") else []),
        f"![{result['n']} samples, the first 64]({args.name}_samples.png)",
        "",
        f"Memorisation: {100 * m.share:.1f}% of samples have a training image closer than the threshold "
        f"({m.threshold:.3g}, {m.space} space).",
        "",
        "Licence: the weights are derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.",
        "",
    ]
    card = "\n".join(lines)
    kept = card_section(path.read_text(), "bench_samplers") if path.exists() else None
    if kept is not None:   # the samplers table scripts/bench_samplers.py --card wrote stays
        card = replace_card_section(card, "bench_samplers", kept.split("\n", 1)[1].rsplit("\n", 1)[0])
    write_text_atomic(path, card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=NAME, help="file name of the checkpoint, card and sample grid")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-decay", default="constant", choices=DECAYS,
                        help="after the warm-up: constant, or a cosine down to 0 at --steps")
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--prediction", default="epsilon")
    parser.add_argument("--zero-terminal-snr", action="store_true", help="rescale the schedule (Lin et al. 2024)")
    parser.add_argument("--objective", default="diffusion", choices=OBJECTIVES,
                        help="flow: rectified flow's velocity (--schedule, --prediction unused; sampled by Euler)")
    parser.add_argument("--timestep-sampling", default="uniform", choices=TIMESTEP_SAMPLING,
                        help="with --objective flow: uniform t, or SD 3's logit-normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--run-dir", default=str(ROOT / "runs"))
    parser.add_argument("--out-dir", default=str(ROOT / "checkpoints"))
    parser.add_argument("--card-only", action="store_true")
    parser.add_argument("--eval-samples", type=int, default=398)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--eval-sampler", default="ddim")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="every this many steps, measure the EMA weights (--curve-n samples) for the card's curve")
    parser.add_argument("--curve-n", type=int, default=128, help="samples per point of that curve (default 128)")
    parser.add_argument("--init-from", default=None,
                        help="an exported model (.safetensors) to start from: its weights, fresh optimizer and EMA")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out_dir) / f"{args.name}.safetensors"
    card = Path(args.out_dir) / f"{args.name}.md"
    state = Path(args.run_dir) / f"{args.name}.train.safetensors"
    init_file = Path(args.run_dir) / f"{args.name}.init.json"     # what --init-from started from, kept for resumes
    if not args.card_only:
        images = load_emoji(size=32, split="train").images
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=200, lr_decay=args.lr_decay,
                             schedule=args.schedule, prediction=args.prediction, seed=args.seed,
                             zero_terminal_snr=args.zero_terminal_snr, objective=args.objective,
                             timestep_sampling=args.timestep_sampling)
        if state.exists():      # flags that differ from the checkpoint's settings are refused, naming them
            trainer = Trainer.resume(state, images, device=args.device, steps=args.steps, config=config)
            print(f"resumed at step {trainer.step} of {args.steps}")
        else:
            torch.manual_seed(args.seed)
            unet = UNet(get_preset(args.preset))
            if args.init_from:
                start, _, before = load_model(args.init_from)
                if start.config != unet.config:
                    raise SystemExit(f"--init-from {args.init_from} is a different U-Net than preset {args.preset!r}")
                unet.load_state_dict(start.state_dict())
                unet.requires_grad_(True)
                print(f"initialised from {args.init_from} ({before['train_config']['steps']} steps, "
                      f"{before.get('machine')})")
                init_file.write_text(json.dumps(chain_entry(args.init_from, before, Path(args.run_dir))))
            trainer = Trainer(unet, images, config, device=args.device)
        deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
        curve_file = Path(args.run_dir) / f"{args.name}.curve.json"
        curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
        while trainer.step < args.steps and (deadline is None or time.monotonic() < deadline):
            every = args.curve_every or args.steps
            target = min(args.steps, (trainer.step // every + 1) * every)
            trainer.train(target, checkpoint_path=state, checkpoint_every=100,
                          max_seconds=None if deadline is None else deadline - time.monotonic())
            if args.curve_every and trainer.step == target and all(p["step"] != target for p in curve):
                point = trainer.export(Path(args.run_dir) / f"{args.name}.curve.safetensors", overwrite=True)
                r = measure(point, args.curve_n, args.eval_steps, args.eval_sampler, args.seed, memorised=False)
                curve.append({"step": target, "train_seconds": round(trainer.seconds, 1), "n": args.curve_n,
                              "fid": round(r["quality"].fid, 3), "floor_fid": round(r["floor"].fid, 3),
                              "precision": round(r["quality"].precision, 3), "recall": round(r["quality"].recall, 3)})
                write_text_atomic(curve_file, json.dumps(curve, indent=1))
                print(f"step {target}: FID {r['quality'].fid:.2f} at n = {args.curve_n} (floor {r['floor'].fid:.2f})",
                      flush=True)
        print(f"step {trainer.step}: {trainer.seconds / 60:.1f} min of training so far")
        if trainer.step < args.steps:
            print("not finished; run the same command again to continue")
            return
        trainer.export(out, overwrite=True, info={
            "machine": machine(), "preset": args.preset, "curve": curve or None, "command": " ".join(["python", "scripts/train_ddpm.py"] + sys.argv[1:]),
            "initialised_from": json.loads(init_file.read_text()) if init_file.exists() else None})
        print(f"exported {out} ({out.stat().st_size / 1e6:.2f} MB)")

    model, _, info = load_model(out)
    result = measure(out, args.eval_samples, args.eval_steps, args.eval_sampler, args.seed)
    first = info.get("initialised_from")
    if first and Path(first["path"]).exists():      # the curve's earlier point: the weights it started from
        before = measure(Path(first["path"]), args.eval_samples, args.eval_steps, args.eval_sampler, args.seed)
        result["curve"] = [(info["steps_total"] - info["steps"], info["train_seconds_total"] - info["train_seconds"],
                            before["quality"]), (info["steps_total"], info["train_seconds_total"], result["quality"])]
    print(f"FID {result['quality']}, floor {result['floor']}, memorisation {result['memorisation'].share:.3f}")
    from course_lib.plotting import save_grid_png
    save_grid_png(result["samples"][:64], Path(args.out_dir) / f"{args.name}_samples.png")
    write_card(card, args, info, result, count_parameters(model))
    print(f"wrote {card}")


if __name__ == "__main__":
    main()
