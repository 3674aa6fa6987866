"""Benchmark the samplers: seconds and sample quality (FID, KID) against the number of steps.

    python scripts/bench_samplers.py                                   # the defaults: a CPU run of ~10-15 minutes
    python scripts/bench_samplers.py --n 1000 --device cuda --threads 0   # on a GPU
    python scripts/bench_samplers.py --samplers ddim,dpm++2m --steps-list 5,10,20

Every sampler starts from the same n noise images x_T (drawn from --seed), so DDIM and DPM-Solver++,
both solvers of the same ODE, aim at the same images; DDPM draws fresh noise at each step from a second
generator (--seed + 1). Seconds cover sampling only, measured after one warm-up call. FID and KID are
measured in the course's feature space (course_lib.metrics: a frozen emoji classifier, not Inception, so
the numbers compare only with each other) against the held-out emoji, beside the real-versus-real floor
at the same n: a figure means something only next to its floor.

It prints a markdown table (for the README) with the machine it ran on, then a second one that runs the
deterministic samplers against diffusers' schedulers (DDIMScheduler, DPMSolverMultistepScheduler, set up to
the same rules: trailing timesteps, x0 clipped to [-1, 1]) with the same model and noise: the time ratio and
the largest difference between the images. diffusers is a test-only dependency; without it that table is
skipped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import metrics  # noqa: E402
from course_lib.checkpoint import replace_card_section  # noqa: E402
from course_lib.unet_file import load_model  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.sampling import SAMPLERS, sample  # noqa: E402
from course_lib.settings import default_device, describe_machine, timed  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 10,20,50; got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be positive; got {text!r}")
    return values


def sampler_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in SAMPLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown or text!r}; choose from {', '.join(SAMPLERS)}")
    return names


def generate(model, schedule, prediction: str, x_T: torch.Tensor, sampler: str, steps: int, seed: int,
             batch_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Samples (course_lib.sampling.sample) from the given x_T in batches, and the seconds they took
    (course_lib.settings.timed). Kept here: the course's pipeline.generate batches a text-to-image pipeline's
    prompts; this benchmark starts an unconditional model from fixed noise shared by every sampler."""
    noise = torch.Generator().manual_seed(seed)   # DDPM's fresh noise (a CPU generator: same numbers on any device)
    return timed(lambda: torch.cat([
        sample(model, schedule, tuple(batch.shape), sampler=sampler, steps=steps, prediction=prediction,
               x_T=batch.to(device), generator=noise, device=device).cpu() for batch in x_T.split(batch_size)]))


DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_loop(sampler: str, schedule, steps: int, prediction: str = "epsilon"):
    """A diffusers scheduler configured to course_lib's rules, or None if diffusers is not installed."""
    try:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    except ImportError:
        return None
    betas = schedule.betas.numpy()
    if sampler == "ddim":
        ref = DDIMScheduler(num_train_timesteps=schedule.T, trained_betas=betas, clip_sample=True,
                            set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0,
                            prediction_type=DIFFUSERS_PREDICTION[prediction])
    else:
        ref = DPMSolverMultistepScheduler(num_train_timesteps=schedule.T, trained_betas=betas,
                                          algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                          thresholding=True, sample_max_value=1.0, final_sigmas_type="zero",
                                          lower_order_final=True, timestep_spacing="trailing",
                                          prediction_type=DIFFUSERS_PREDICTION[prediction])
    ref.set_timesteps(steps)
    return ref


def run_diffusers(ref, sampler: str, model, x_T: torch.Tensor, batch_size: int, device: torch.device):
    """The diffusers denoising loop over x_T in batches; (images, seconds)."""
    def run() -> torch.Tensor:
        out = []
        for batch in x_T.split(batch_size):
            x = batch.to(device)
            ref.set_timesteps(len(ref.timesteps))   # resets DPM-Solver's history
            with torch.no_grad():
                for t in ref.timesteps:
                    output = model(x, t.to(device).expand(len(x)))
                    kw = {"use_clipped_model_output": True} if sampler == "ddim" else {}
                    x = ref.step(output, t, x, **kw).prev_sample
            out.append(x.cpu())
        return torch.cat(out)
    return timed(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "ddpm_emoji32.safetensors")
    ap.add_argument("--n", type=int, default=64, help="samples per sampler and step count (FID needs hundreds "
                                                      "for small bias; the floor at the same n is printed)")
    ap.add_argument("--steps-list", type=int_list, default=[10, 20, 50], help="step counts for every sampler")
    ap.add_argument("--ddpm-steps", type=int_list, default=[100, 250],
                    help="extra step counts for DDPM only (e.g. 1000, the chain it was trained on); '' for none")
    ap.add_argument("--samplers", type=sampler_list, default=list(SAMPLERS), help=f"from {', '.join(SAMPLERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: a CUDA GPU if there is one, else the CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 500 on a GPU, 64 on the CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--reference", default="heldout", choices=metrics.REFERENCES)
    ap.add_argument("--card", type=Path, default=None,
                    help="also write the table into this model card (a marked block; other text is kept)")
    ap.add_argument("--compare-steps", type=int, default=20,
                    help="step count for the comparison with diffusers' schedulers (0: skip it)")
    args = ap.parse_args()
    started = time.perf_counter()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    batch_size = args.batch_size or (500 if device.type == "cuda" else 64)
    if args.n < 4:
        ap.error(f"--n must be at least 4 (FID and KID need a few samples); got {args.n}")
    model, schedule, info = load_model(args.model, device=device)
    prediction = info["prediction"]
    C, S = model.config.in_channels, model.config.image_size

    runs = [(s, k) for s in args.samplers for k in args.steps_list]
    if "ddpm" in args.samplers:
        runs += [("ddpm", k) for k in args.ddpm_steps if k not in args.steps_list]
    runs.sort(key=lambda r: (SAMPLERS.index(r[0]), r[1]))
    too_many = [k for _, k in runs if k > schedule.T]
    if too_many:
        ap.error(f"step counts must be at most the schedule's T={schedule.T}; got {too_many}")

    trained = info.get("steps_total", info.get("steps", "?"))                   # the whole chain of runs
    model_line = (f"{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model} "
                  f"({trained} training steps, {prediction} prediction, {schedule.name} schedule, "
                  f"T={schedule.T}{', provisional' if info.get('provisional') else ''})")
    print(f"model: {model_line}", file=sys.stderr)
    x_T = torch.randn((args.n, C, S, S), generator=torch.Generator().manual_seed(args.seed))
    sample(model, schedule, (2, C, S, S), sampler="ddim", steps=2, prediction=prediction, device=device)  # warm-up
    floor = metrics.floor(args.n, size=S, reference=args.reference, device=device)
    real_colour = metrics.colour(load_emoji(size=S, split=args.reference).images)

    rows = []
    for sampler, steps in runs:
        images, seconds = generate(model, schedule, prediction, x_T, sampler, steps, args.seed + 1, batch_size, device)
        q = metrics.evaluate(images, reference=args.reference, with_floor=False, device=device)
        colour = metrics.colour(images)
        rows.append((sampler, steps, seconds, q, colour))
        print(f"  {sampler:8s} {steps:5d} steps: {seconds:7.1f} s, {q}, chroma {colour.chroma:.3f}", file=sys.stderr,
              flush=True)

    machine = describe_machine(device, detail=True)
    print(f"\nSamplers on {machine}.\nModel: {model_line}; n = {args.n} samples each (batch {batch_size}), "
          f"seed {args.seed}, against the {args.reference} emoji in the course's feature space. Colour "
          f"(course_lib.metrics.colour): mean chroma against the {args.reference} emoji's ({real_colour.chroma:.3f}), "
          f"and the share of values at the ends of [-1, 1] (theirs: {real_colour.at_ends:.1%}).\n")
    table = ["| sampler | steps | seconds | samples/s | FID | KID ± std | floor FID | floor KID | chroma / real's | "
             "at the ends |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sampler, steps, seconds, q, colour in rows:
        table.append(f"| {sampler} | {steps} | {seconds:.1f} | {args.n / seconds:.1f} | {q.fid:.2f} | "
                     f"{q.kid_mean:.4f} ± {q.kid_std:.4f} | {floor.fid:.2f} | {floor.kid_mean:.4f} | "
                     f"{colour.chroma / real_colour.chroma:.2f}x | {colour.at_ends:.1%} |")
    print("\n".join(table))
    if args.card is not None:
        command = shlex.join(["python", "scripts/bench_samplers.py"] + sys.argv[1:])
        body = (f"## Samplers\n\nMeasured by `{command}` on {machine}: n = {args.n} samples per row from the "
                f"same starting noise, seed {args.seed}, against the {args.reference} emoji in the course's feature "
                f"space, the floor at the same n beside; colour is the mean chroma against the real emoji's "
                f"({real_colour.chroma:.3f}) and the share of values at the ends of [-1, 1] (theirs: "
                f"{real_colour.at_ends:.1%}). Seconds are wall time on the machine named.\n\n" + "\n".join(table))
        args.card.write_text(replace_card_section(args.card.read_text(), "bench_samplers", body))
        print(f"(written into {args.card})", file=sys.stderr)

    compare = [s for s in ("ddim", "dpm++2m") if s in args.samplers] if args.compare_steps > 0 else []
    if compare and diffusers_loop("ddim", schedule, args.compare_steps) is None:
        print("\n(diffusers is not installed: no comparison with its schedulers)")
        compare = []
    if compare:
        import diffusers
        print(f"\nAgainst diffusers {diffusers.__version__}, same model, same x_T, {args.compare_steps} steps, "
              f"n = {args.n}:\n")
        print("| sampler | course_lib s | diffusers s | time ratio (course_lib / diffusers) | max abs difference |")
        print("|---|---:|---:|---:|---:|")
        for sampler in compare:
            ours, ours_s = generate(model, schedule, prediction, x_T, sampler, args.compare_steps, args.seed + 1,
                                    batch_size, device)
            ref = diffusers_loop(sampler, schedule, args.compare_steps, prediction)
            theirs, theirs_s = run_diffusers(ref, sampler, model, x_T, batch_size, device)
            print(f"| {sampler} | {ours_s:.1f} | {theirs_s:.1f} | {ours_s / theirs_s:.2f} | "
                  f"{(ours - theirs).abs().max().item():.1e} |", flush=True)

    command = shlex.join(["python", "scripts/bench_samplers.py"] + sys.argv[1:])
    print(f"\n`{command}` ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
