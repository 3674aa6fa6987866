"""A tiny SD 3 against the tiny SD: the same text-to-image U-Net trained with rectified flow, at equal steps.

    python scripts/train_tiny_sd.py --out-dir RUN/ckpt --run-dir RUN/runs --threads 1 --stage t2i \
        --t2i-steps 2012 --objective flow --timestep-sampling logit_normal      # after copying the VAE and CLIP to RUN/ckpt
    python scripts/bench_tiny_sd3.py --flow RUN/ckpt/tiny_sd_emoji.safetensors --threads 1

The shipped tiny SD (checkpoints/tiny_sd_emoji: epsilon prediction, scaled-linear schedule) and the flow model
share everything but the objective: U-Net preset, VAE, text encoder, data, batch, learning rate, EMA, caption
dropout, seed and number of training steps (the model cards and the flow file's info hold both runs). Each samples
one image per held-out caption (398 emoji no model saw) with guidance 3 at 1, 2, 4, 8, 16 and 32 steps, from the
same starting noise: DDIM for the tiny SD (its sampler), Euler for the flow, both one guided U-Net call a step.
Scored by judges that condition neither: FID, precision and recall in the course's feature space against the
held-out emoji (with the real-vs-real floor at the same n), and the independent mini CLIP (checkpoints/clip_judge):
the share of images whose own caption it ranks first (top-5) among all 398, beside the real images' share.
Prints the table and writes results/tiny_sd3.json and a grid of samples, results/tiny_sd3_samples.png.
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

from course_lib import checkpoint as ckpt  # noqa: E402
from course_lib.unet_file import load_model  # noqa: E402
from course_lib import metrics  # noqa: E402
from course_lib.clip import load_clip, retrieval_accuracy, similarity  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage, generate  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402

RESULTS = ROOT / "results" / "tiny_sd3.json"
SAMPLES = ROOT / "results" / "tiny_sd3_samples.png"
LABELS = {"diffusion": "tiny SD (DDPM, epsilon), DDIM", "flow": "tiny SD 3 (rectified flow), Euler"}
SAMPLER = {"diffusion": "ddim", "flow": "euler"}   # on the flow's path DDIM's step is Euler's; named as the paper does
GRID_STEPS = (1, 2, 4, 32)   # the rows of the sample grid
GRID_PROMPTS = 8


def judged(judge, tokenizer, images: torch.Tensor, captions: list[str]) -> dict:
    """The independent judge's retrieval accuracy (own caption among all) and mean score of the own caption."""
    sim = similarity(judge, tokenizer, images, captions)
    acc = retrieval_accuracy(sim)
    return {"judge_top1": acc[1], "judge_top5": acc[5], "judge_score": sim.diag().mean().item()}


def config_differences(infos: dict) -> dict:
    """The training settings in which the two runs differ, {field: [tiny SD's, flow's]} (objective and timestep
    sampling, and fields the flow objective does not use, such as the prediction type)."""
    a, b = infos["diffusion"]["train_config"], infos["flow"]["train_config"]
    diff = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    for k in ("preset", "steps", "n_images", "vae", "clip"):
        if infos["diffusion"].get(k) != infos["flow"].get(k):
            diff[k] = [infos["diffusion"].get(k), infos["flow"].get(k)]
    return diff


def table(result: dict) -> str:
    lines = [f"{'model, sampler':>36} {'steps':>5} {'FID':>7} {'precision':>9} {'recall':>6} {'judge top-1':>11} "
             f"{'top-5':>6} {'seconds':>7}"]
    for r in result["rows"]:
        lines.append(f"{LABELS[r['objective']]:>36} {r['steps']:>5} {r['fid']:>7.2f} {r['precision']:>9.2f} "
                     f"{r['recall']:>6.2f} {r['judge_top1']:>11.3f} {r['judge_top5']:>6.3f} {r['seconds']:>7.1f}")
    f, real = result["floor"], result["real"]
    lines.append(f"{'floor (real vs real) / real images':>36} {'':>5} {f['fid']:>7.2f} {f['precision']:>9.2f} "
                 f"{f['recall']:>6.2f} {real['judge_top1']:>11.3f} {real['judge_top5']:>6.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", required=True, help="the flow U-Net's file (train_tiny_sd.py --objective flow)")
    ap.add_argument("--steps", default="1,2,4,8,16,32")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--captions", type=int, default=None, help="the first n held-out captions (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--samples", default=str(SAMPLES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_list = [int(s) for s in args.steps.split(",")]
    ddpm = TextToImage.from_shipped(device=args.device)
    flow = TextToImage.from_files(args.flow, ckpt.shipped(SHIPPED["clip"]), ckpt.shipped(SHIPPED["vae"]),
                                  device=args.device)
    if flow.prediction != "flow":
        raise SystemExit(f"{args.flow} was trained with prediction {flow.prediction!r}, not rectified flow")
    infos = {"diffusion": load_model(ckpt.shipped(SHIPPED["unet"]))[2], "flow": load_model(args.flow)[2]}
    heldout = load_emoji(size=32, split="heldout")
    captions, real = heldout.captions[:args.captions], heldout.images[:args.captions]
    judge, judge_tokenizer, _ = load_clip(ckpt.shipped("clip_judge"), device=args.device)
    floor = metrics.floor(n=len(captions))
    result = {"command": " ".join(["python", "scripts/bench_tiny_sd3.py"] + sys.argv[1:]),
              "machine": describe_machine(), "n": len(captions), "guidance": args.guidance,
              "training": {k: {key: info.get(key) for key in ("steps", "train_seconds", "machine", "command",
                                                               "preset", "train_config")}
                           for k, info in infos.items()},
              "config_differences": config_differences(infos),
              "floor": {"fid": floor.fid, "precision": floor.precision, "recall": floor.recall},
              "real": judged(judge, judge_tokenizer, real, captions), "rows": []}
    grid = {}
    print("training settings that differ:", result["config_differences"], flush=True)
    for objective, pipe in (("diffusion", ddpm), ("flow", flow)):
        for steps in steps_list:
            t0 = time.perf_counter()
            images = generate(pipe, captions, seed=0, steps=steps, guidance_scale=args.guidance,
                              sampler=SAMPLER[objective])
            seconds = time.perf_counter() - t0
            q = metrics.evaluate(images, reference="heldout", with_floor=False)
            row = {"objective": objective, "sampler": SAMPLER[objective], "steps": steps,
                   "fid": q.fid, "kid": q.kid_mean, "precision": q.precision, "recall": q.recall,
                   **judged(judge, judge_tokenizer, images, captions), "seconds": round(seconds, 1)}
            result["rows"].append(row)
            print(row, flush=True)
            if steps in GRID_STEPS:
                grid[objective, steps] = images[:GRID_PROMPTS]
    text = table(result)
    result["table"] = text
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    rows = [real[:GRID_PROMPTS]] + [grid[o, s] for o in ("diffusion", "flow") for s in GRID_STEPS if (o, s) in grid]
    save_grid_png(torch.cat(rows), args.samples, columns=GRID_PROMPTS)
    print(f"wrote {out} and {args.samples} (rows: real; {LABELS['diffusion']} at {GRID_STEPS} steps; "
          f"{LABELS['flow']} at the same)")


if __name__ == "__main__":
    main()
