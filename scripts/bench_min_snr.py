"""Min-SNR-gamma loss weighting (Hang et al. 2023) against none: the same model, data, seed and steps.

    python scripts/bench_min_snr.py                                   # the defaults: ~25 minutes on one CPU thread
    python scripts/bench_min_snr.py --size 32 --preset small --steps 2000,4000 --device cuda --threads 0

Both runs train the same U-Net from the same initial weights on the same batches, timesteps and noise (one
seeded generator), with v-prediction on the cosine schedule rescaled to zero terminal SNR (the course's fixed
configuration, notebook 05). The only difference is the weight on each timestep's loss: none, or
min(SNR, gamma) / (SNR + 1), min-SNR-gamma's weight written for a v-prediction target (course_lib.forward.snr_weight).
At each step count in --steps, both EMA models sample the same n starting noises with DDIM (--sample-steps)
and are scored by FID and KID against the held-out emoji at the training size, beside the real-versus-real
floor at the same n. Equal steps here are also (nearly) equal time: the weighting costs nothing measurable.
It prints a markdown table with the machine and writes each final sample grid to runs/min_snr/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course_lib import metrics  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.settings import default_device, describe_machine  # noqa: E402
from course_lib.train import TrainConfig, Trainer  # noqa: E402
from course_lib.unet import UNet, count_parameters, get_preset  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = sorted(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, e.g. 1000,2000; got {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive; got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="image size in px (default 16: the CPU learner's problem)")
    ap.add_argument("--preset", default="tiny", help="U-Net preset (course_lib.unet.get_preset)")
    ap.add_argument("--steps", type=int_list, default=[1000, 2000, 4000], help="step counts at which to score")
    ap.add_argument("--gamma", type=float, default=5.0, help="min-SNR gamma (Hang et al. use 5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n", type=int, default=256, help="samples per score")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    images = load_emoji(size=args.size, split="train").images
    floor = metrics.floor(args.n, size=args.size, device=device)

    trainers = {}
    for name, gamma in (("none", None), (f"min-SNR γ={args.gamma:g}", args.gamma)):
        torch.manual_seed(args.seed)
        cfg = TrainConfig(steps=args.steps[-1], batch_size=args.batch_size, lr=args.lr, warmup=100, prediction="v",
                          schedule="cosine", zero_terminal_snr=True, min_snr_gamma=gamma, seed=args.seed)
        trainers[name] = Trainer(UNet(get_preset(args.preset, image_size=args.size)), images, cfg, device=device)
    params = count_parameters(next(iter(trainers.values())).model)

    rows = []
    for steps in args.steps:
        for name, tr in trainers.items():
            tr.train(steps, progress=False)
            samples = tr.sample(args.n, steps=args.sample_steps, seed=args.seed + 1)
            q = metrics.evaluate(samples, with_floor=False, device=device)
            rows.append((steps, name, tr.seconds, q))
            print(f"  {name:14s} {steps:6d} steps, {tr.seconds:6.0f} s: {q}", file=sys.stderr, flush=True)
            if steps == args.steps[-1]:
                out = ROOT / "runs" / "min_snr" / f"{'none' if name == 'none' else 'min_snr'}_{steps}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                save_grid_png(samples[:64], out, columns=16)

    print(f"\nMin-SNR weighting against none on {describe_machine()}.\nU-Net preset {args.preset!r} "
          f"({params:,} parameters) at {args.size} px, all {len(images):,} training emoji, batch {args.batch_size}, "
          f"lr {args.lr:g}, v-prediction, cosine schedule rescaled to zero terminal SNR, seed {args.seed}; "
          f"EMA weights, DDIM {args.sample_steps} steps, n = {args.n}, against the held-out emoji.\n")
    print("| weighting | training steps | training s | FID | KID ± std | floor FID | floor KID |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for steps, name, seconds, q in rows:
        print(f"| {name} | {steps} | {seconds:.0f} | {q.fid:.2f} | {q.kid_mean:.4f} ± {q.kid_std:.4f} | "
              f"{floor.fid:.2f} | {floor.kid_mean:.4f} |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s in all; command: python scripts/bench_min_snr.py "
          f"{' '.join(sys.argv[1:])})")
