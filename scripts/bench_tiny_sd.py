"""The tiny Stable Diffusion's schedule, sampler settings and guidance, checked as notebook 05 checks the pixel model.

    python scripts/bench_tiny_sd.py                  # the defaults: n = 256 held-out captions, ~15 min on one CPU thread
    python scripts/bench_tiny_sd.py --n 398 --device cuda --threads 0

The shipped tiny SD (checkpoints/tiny_sd_emoji) predicts epsilon on Stable Diffusion's scaled-linear schedule,
whose alpha-bar at t = T-1 is not zero: notebook 05's flaw (an error in eps-hat reaches x0-hat multiplied by
sqrt((1 - abar) / abar)) is far smaller there than on the cosine schedule, and latents are never clamped. This
script measures whether that is enough, the way notebook 05 measures the pixel models:

1. the schedule: alpha-bar at T-1 and the amplification of an eps-hat error into x0-hat there;
2. sampler settings at the default guidance: the course's default (DDIM, 20 trailing steps), more steps,
   DPM-Solver++, DDPM with 250 steps, and Stable Diffusion's leading spacing;
3. guidance scale against rescaled guidance (Lin et al. 2024, Sec. 3.4, phi) at several scales.

Every row generates one image per held-out caption (n captions evenly spread over the 398, emoji the models
never saw) from the same starting noises, and reports: FID and KID against the held-out images (course_lib.metrics,
floor beside it); colour (course_lib.metrics.colour: mean chroma against the real images', and the share of values
at the ends of [-1, 1]); text fidelity: the share of images whose own caption the mini CLIP ranks first among the
n captions, beside real images' score. The mini CLIP is the text encoder the U-Net follows, so that column
measures agreement with the conditioning, not an independent judgement (issue 16 adds one).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import metrics  # noqa: E402
from course_lib.clip import retrieval_accuracy, similarity  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.pipeline import TextToImage  # noqa: E402
from course_lib.settings import default_device, describe_machine  # noqa: E402

SAMPLER_ROWS = [  # (label, sampler, steps, spacing)
    ("DDIM 20, trailing (default)", "ddim", 20, "trailing"),
    ("DDIM 50, trailing", "ddim", 50, "trailing"),
    ("DPM-Solver++ 20, trailing", "dpm++2m", 20, "trailing"),
    ("DDIM 20, leading", "ddim", 20, "leading"),
    ("DDPM 250, trailing", "ddpm", 250, "trailing"),
]


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,4,7.5; got {text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="held-out captions, one image each (2..398)")
    ap.add_argument("--scales", type=float_list, default=[1.0, 4.0, 7.5, 12.0], help="guidance scales of part 3")
    ap.add_argument("--phis", type=float_list, default=[0.0, 0.7], help="rescale phi values of part 3")
    ap.add_argument("--skip-samplers", action="store_true", help="only part 3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if not 2 <= args.n <= 398:
        ap.error(f"--n must be from 2 to 398 (the held-out captions); got {args.n}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()

    pipe = TextToImage.from_shipped(device=device)
    heldout = load_emoji(size=32, split="heldout")
    pick = torch.linspace(0, len(heldout) - 1, args.n).round().long()
    prompts = [heldout.captions[i] for i in pick.tolist()]
    real = heldout.images[pick]
    real_colour = metrics.colour(real)
    real_top1 = retrieval_accuracy(similarity(pipe.clip, pipe.tokenizer, real, prompts, device=device))[1]
    floor = metrics.floor(args.n, device=device)

    abar = pipe.schedule.alphas_cumprod[-1].item()
    print(f"Tiny SD ({pipe.prediction} prediction, T = {pipe.schedule.T}) on {describe_machine()}; "
          f"n = {args.n} held-out captions, seed {args.seed}.")
    print(f"alpha-bar at t = T-1: {abar:.2e}; an error in eps-hat reaches x0-hat there multiplied by "
          f"sqrt((1 - abar) / abar) = {math.sqrt((1 - abar) / abar):.1f} (the pixel eps model's cosine schedule: "
          f"about 20,291).")
    print(f"Real held-out images: chroma {real_colour.chroma:.3f}, {real_colour.at_ends:.1%} of values at the ends, "
          f"mini-CLIP top-1 {real_top1:.3f} among the {args.n} captions. Floor (real vs real, n = {args.n}): "
          f"FID {floor.fid:.2f}, KID {floor.kid_mean:.4f}.\n")

    def row(label: str, **options) -> str:
        start = time.perf_counter()
        images = pipe.generate(prompts, seed=args.seed, **options)
        seconds = time.perf_counter() - start
        q = metrics.evaluate(images, with_floor=False, device=device)
        c = metrics.colour(images)
        top1 = retrieval_accuracy(similarity(pipe.clip, pipe.tokenizer, images, prompts, device=device))[1]
        print(f"  {label}: {q}, chroma {c.chroma:.3f}, top-1 {top1:.3f}, {seconds:.0f} s", file=sys.stderr, flush=True)
        return (f"| {label} | {q.fid:.2f} | {q.kid_mean:.4f} ± {q.kid_std:.4f} | {c.chroma / real_colour.chroma:.2f}x | "
                f"{c.at_ends:.1%} | {top1:.3f} | {seconds:.0f} |")

    header = ("| {} | FID | KID ± std | chroma / real's | values at the ends | mini-CLIP top-1 | seconds |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
    default = pipe.sampler_settings
    if not args.skip_samplers:
        lines = [row(label, sampler=s, steps=k, settings=default.replace(spacing=spacing))
                 for label, s, k, spacing in SAMPLER_ROWS]
        print(f"Sampler settings at guidance {default.guidance_scale:g}, no rescale:\n")
        print(header.format("sampler"))
        print("\n".join(lines) + "\n")
    lines = [row(f"guidance {g:g}, phi {phi:g}", guidance_scale=g, guidance_rescale=phi)
             for g in args.scales for phi in args.phis if not (g == 1 and phi > 0)]   # at scale 1 phi changes nothing
    print(f"Guidance scale against rescaled guidance (phi), {default.sampler.upper()} {default.steps} "
          f"{default.spacing} steps:\n")
    print(header.format("guidance"))
    print("\n".join(lines))
    print(f"\nfloor FID {floor.fid:.2f}; real images: chroma {real_colour.chroma:.3f} (1.00x), "
          f"{real_colour.at_ends:.1%} at the ends, top-1 {real_top1:.3f}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s in all; command: python scripts/bench_tiny_sd.py "
          f"{' '.join(sys.argv[1:])})")
