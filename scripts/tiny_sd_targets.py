"""The tiny SD's quality targets measured the way issue 28 states them: the pipeline's defaults (DDIM 20 trailing
steps, guidance 4), one image per held-out caption (n = 398, image k from seed k), against the held-out emoji.

    python scripts/tiny_sd_targets.py                          # the shipped stack (checkpoints/)
    python scripts/tiny_sd_targets.py --dir runs/s3/ckpt --json results/tiny_sd_targets.json

Reports FID and KID with two floors: real training emoji against the held-out ones at the same n, and the same
matched to the captions (each held-out caption's subcategory drawn from the training emoji: what a model that drew
real emoji of the asked-for kind would score; a text-to-image model is conditioned on those captions, so this is
its fair floor), precision and recall, sharpness (course_lib.metrics.high_frequency_share of the samples over the real held-out emoji's: 1 is as
sharp as the data), and text fidelity by the independent judge (clip_judge, never used for conditioning): how
often it ranks an image's own caption first among the n, beside the real emoji's score. Targets: FID at most
1.15x the floor (both ratios printed), sharpness at least 0.85.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib import metrics  # noqa: E402
from course_lib.checkpoint import shipped, write_text_atomic  # noqa: E402
from course_lib.clip import load_clip, retrieval_accuracy, similarity  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(ROOT / "checkpoints"), help="the folder holding the VAE, CLIP and U-Net")
    p.add_argument("--n", type=int, default=398)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    pipe = TextToImage.from_files(*(folder / f"{SHIPPED[k]}.safetensors" for k in ("unet", "clip", "vae")))
    heldout = load_emoji(size=32, split="heldout", limit=args.n)
    start = time.perf_counter()
    images = pipe.generate(heldout.captions, seed=0)                        # the pipeline's defaults
    seconds = time.perf_counter() - start
    q = metrics.evaluate(images)
    matched = metrics.floor(match=heldout.subcategories)
    sharpness = metrics.high_frequency_share(images) / metrics.high_frequency_share(heldout.images)
    judge, judge_tokenizer, _ = load_clip(shipped("clip_judge"))
    top1 = retrieval_accuracy(similarity(judge, judge_tokenizer, images, heldout.captions))[1]
    real_top1 = retrieval_accuracy(similarity(judge, judge_tokenizer, heldout.images, heldout.captions))[1]
    result = {"dir": str(args.dir), "n": len(images), "settings": str(pipe.sampler_settings), "seconds": round(seconds, 1),
              "fid": q.fid, "kid": q.kid_mean, "kid_std": q.kid_std, "precision": q.precision, "recall": q.recall,
              "floor_fid": q.floor.fid, "fid_over_floor": q.fid / q.floor.fid, "matched_floor_fid": matched.fid,
              "fid_over_matched_floor": q.fid / matched.fid, "sharpness": sharpness,
              "judge_top1": top1, "real_judge_top1": real_top1, "machine": describe_machine(),
              "command": " ".join(["python", "scripts/tiny_sd_targets.py"] + sys.argv[1:])}
    print(f"{q}\ncaption-matched floor: {matched}\nsharpness {sharpness:.3f} of the real emoji's; independent judge top-1 {top1:.3f} (real {real_top1:.3f})")
    print(f"targets: FID at most 1.15x the floor: {q.fid / q.floor.fid:.2f}x "
          f"({'met' if q.fid <= 1.15 * q.floor.fid else 'not met'}), {q.fid / matched.fid:.2f}x the caption-matched "
          f"floor ({'met' if q.fid <= 1.15 * matched.fid else 'not met'}); sharpness at least 0.85: {sharpness:.2f} "
          f"({'met' if sharpness >= 0.85 else 'not met'})")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
