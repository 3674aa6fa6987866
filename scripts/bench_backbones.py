"""The U-Net against the DiT and SD 3's MMDiT at equal training compute: which backbone makes the better tiny SD?

    python scripts/bench_backbones.py                        # the 4 default models, 15 TFLOP each: ~40 min, 1 thread
    python scripts/bench_backbones.py --dit                  # the two DiTs as well
    python scripts/bench_backbones.py --models sd_tiny,mmdit_tiny,mmdit_mid --budget-tflop 4
    python scripts/bench_backbones.py --estimate             # FLOPs and seconds per step only: the run's duration
    python scripts/bench_backbones.py --quick                # seconds: the same code on a few images, writes nothing

The question (issue 32, item 4): with the same data, objective, text encoder and training budget, which denoiser
gives the better text-to-image model, at two or three sizes each? The DiT paper [1] finds that a diffusion
transformer's quality follows its compute (Gflops), and that at equal training compute a larger transformer ends
better. This script tests that in miniature and prints the verdict however it falls.

Every model (MODELS: the U-Net presets sd_tiny and sd_small, the MMDiTs mmdit_tiny, mmdit_mid and mmdit_small, the
DiTs dit_tiny and dit_small, all reading the shipped mini CLIP's 128-d text states) trains from scratch on the same
data: the shipped VAE's latents of every training emoji with the mini CLIP's states of their captions; with the
same objective (rectified flow, logit-normal times, TrainConfig(objective="flow")), batch, warm-up, EMA, seed and
caption dropout 0.1, and a learning rate per family (--lr-unet, --lr-transformer).

The budget is equal training FLOPs. One training step's FLOPs (forward and backward, at the run's batch) are
counted once per model on the CPU with torch.utils.flop_counter.FlopCounterMode (attention through SDPA's math
kernel, so its two products count; elementwise work is not counted, as FLOP counts usually leave it out); a model
then trains round(--budget-tflop / its FLOPs per step) steps, so a cheaper model takes more steps. The wall seconds
of training are recorded too: equal CPU time is the second view, and this machine runs some shapes faster per FLOP.

Each trained model (its EMA weights, exported and loaded by TextToImage.from_files with the shipped clip_emoji and
vae_emoji32) draws one image per held-out caption (the first --n of the 398, image k from seed k) with guidance
--guidance, Euler at each of --sample-steps, and is scored against the held-out emoji in the course's feature space
(course_lib.metrics): FID, KID, precision and recall, beside
    the caption-matched floor: real training emoji of each caption's subcategory (metrics.floor(match=...)), what a
        model that drew real emoji of the asked-for kind would score;
    the VAE ceiling: those same training emoji sent through the VAE (encode, decode): what a latent model that
        reproduced real latents would score, the best these models can do through this VAE;
and the independent judge's top-1 (checkpoints/clip_judge, which conditions no model: the share of images whose
own caption it ranks first among the n), beside the real held-out images' top-1; and seconds per image.

Noise: each model samples a second set at the most steps from other noise (seeds n..2n-1); the FID difference
between the two sets is the sampling noise. The verdict's threshold is twice the largest such difference among the
models; it holds the sampling noise only (a second training seed would cost a second run).

The verdict, printed by code from the numbers (`verdict`): at the most sampling steps, which family's largest model
has the lower FID, and which family's best, each against the threshold; and within each family with two or more
sizes, whether FID falls with the model's forward GFLOPs per image (the DiT paper's axis: at equal training compute,
does a bigger model end better?), a step counting only when it exceeds the threshold.

The record (--out, default results/backbones.json, written atomically after each model) holds the command line,
machine, torch version, every setting and every number. Each model's training is checkpointed under --run-dir
(runs/backbones/<name>.train.safetensors), so an interrupted bench resumes where it stopped; a model measured by an
earlier run with the same settings (the shipped VAE's and mini CLIP's checksums among them) is taken from the record
and not trained again (the output says so).

[1] Peebles, Xie 2023, Scalable Diffusion Models with Transformers. https://arxiv.org/abs/2212.09748
[2] Esser et al. 2024, Scaling Rectified Flow Transformers for High-Resolution Image Synthesis (SD 3).
    https://arxiv.org/abs/2403.03206
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from course_lib import metrics  # noqa: E402
from course_lib.benchmark import shipped_identity  # noqa: E402
from course_lib.checkpoint import keep_earlier, read, shipped, write_text_atomic  # noqa: E402
from course_lib.clip import load_clip  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.dit import DiT, dit_preset  # noqa: E402
from course_lib.mmdit import MMDiT, mmdit_preset  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from course_lib.train import TrainConfig, Trainer  # noqa: E402
from course_lib.unet import UNet, count_parameters, get_preset  # noqa: E402
from course_lib.vae import decode_latents, encode_latents, load_vae  # noqa: E402

from bench_tiny_sd3 import judged  # noqa: E402
from train_tiny_sd import conditioning_for  # noqa: E402

FAMILIES = {"unet": "U-Net", "mmdit": "MMDiT", "dit": "DiT"}
BUILD = {"unet": (UNet, get_preset), "mmdit": (MMDiT, mmdit_preset), "dit": (DiT, dit_preset)}
MODELS = {   # name: (family, preset, fields changed); context_dim is always the mini CLIP's width
    "sd_tiny": ("unet", "sd_tiny", {}),                               # 0.89M params, 7.9 GFLOP a step at batch 64
    "sd_small": ("unet", "sd_small", {}),                             # 3.42M, 29.8 GFLOP (the shipped tiny SD's)
    "mmdit_tiny": ("mmdit", "mmdit_tiny", {}),                        # 0.30M, 1.7 GFLOP
    "mmdit_mid": ("mmdit", "mmdit_small", {"width": 96, "depth": 3}),  # 0.97M, 5.9 GFLOP
    "mmdit_small": ("mmdit", "mmdit_small", {}),                      # 2.30M, 14.1 GFLOP
    "dit_tiny": ("dit", "dit_tiny", {}),                              # 0.19M, 0.67 GFLOP (text: a pooled vector)
    "dit_small": ("dit", "dit_small", {}),                            # 1.90M, 7.7 GFLOP
}
DEFAULT_MODELS = "sd_tiny,sd_small,mmdit_tiny,mmdit_small"
DITS = "dit_tiny,dit_small"
RECORD = ROOT / "results" / "backbones.json"
RUN_DIR = ROOT / "runs" / "backbones"
NOISE_FACTOR = 2.0     # the verdict's threshold: this times the largest FID difference between two sample seeds


def parse_models(text: str) -> list[str]:
    """The comma-separated model names, in order, without repeats; an unknown one is refused, naming the valid."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise ValueError(f"unknown model{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"valid are {', '.join(MODELS)}")
    return names


def build(name: str, context_dim: int) -> torch.nn.Module:
    family, preset, changes = MODELS[name]
    cls, config = BUILD[family]
    return cls(config(preset, **changes, context_dim=context_dim))


def steps_for_budget(budget_tflop: float, flops_per_step: float) -> int:
    """Training steps that spend the budget: round(budget / FLOPs per step), at least 1, so every model's training
    FLOPs lie within half a step's FLOPs of the budget (within one step's where the budget is under half a step)."""
    if budget_tflop <= 0 or flops_per_step <= 0:
        raise ValueError(f"the budget and a step's FLOPs must be positive; got {budget_tflop} TFLOP, {flops_per_step}")
    return max(1, round(budget_tflop * 1e12 / flops_per_step))


def count_flops(model: torch.nn.Module, latents: torch.Tensor, cond, config: TrainConfig) -> tuple[float, float]:
    """(FLOPs of one training step, forward and backward at config.batch_size; forward FLOPs per image), counted on
    the CPU on a copy of the model (the model and every random stream of the run are left alone)."""
    trainer = Trainer(copy.deepcopy(model).cpu(), latents, config, device="cpu", conditioning=cond)
    B = config.batch_size
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        trainer.loss().backward()
    x, t = latents[:B], torch.full((min(B, len(latents)),), 500.0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward, torch.no_grad():
        trainer.model(x, t, cond.context[:B], cond.mask[:B])
    return float(step.get_total_flops()), forward.get_total_flops() / len(x)


def train_config(args, name: str, steps: int) -> TrainConfig:
    lr = args.lr_unet if MODELS[name][0] == "unet" else args.lr_transformer
    return TrainConfig(steps=steps, batch_size=args.batch, lr=lr, warmup=args.warmup, ema_decay=args.ema,
                       latents=True, caption_dropout=0.1, objective="flow", timestep_sampling="logit_normal",
                       timestep_shift=args.timestep_shift, seed=args.seed)


def check_resumable(path: Path, config: TrainConfig) -> None:
    """The Trainer resumes a checkpoint of the same run and would take a new learning rate; here a model's steps must
    all have one rate, so a checkpoint trained at another is refused."""
    if path.is_file():
        saved = TrainConfig.from_json(read(path)[1]["train_config"])
        if saved.lr != config.lr:
            raise SystemExit(f"{path} was trained with lr {saved.lr}, not {config.lr}: give another --run-dir (or "
                             f"delete it) to train this model afresh")


def measure(pipe: TextToImage, captions: list[str], args, judge) -> tuple[list[dict], dict]:
    """One row per sampling-step count, and the seed check: FID of a second set at the most steps."""
    rows = []
    for steps in args.sample_steps:
        t0 = time.perf_counter()
        images = pipe.generate(captions, seed=args.seed, steps=steps, guidance_scale=args.guidance, sampler="euler")
        seconds = time.perf_counter() - t0
        q = metrics.evaluate(images, with_floor=False)
        rows.append({"sample_steps": steps, "fid": q.fid, "kid": q.kid_mean, "kid_std": q.kid_std,
                     "precision": q.precision, "recall": q.recall, **judged(judge[0], judge[1], images, captions),
                     "seconds_per_image": seconds / len(captions)})
        print(f"  Euler {steps:3d} steps: FID {q.fid:.2f}, precision {q.precision:.2f}, recall {q.recall:.2f}, "
              f"judge top-1 {rows[-1]['judge_top1']:.3f}, {seconds / len(captions):.3f} s per image", flush=True)
    most = max(args.sample_steps)
    other = pipe.generate(captions, seed=args.seed + len(captions), steps=most, guidance_scale=args.guidance,
                          sampler="euler")
    fid_other = metrics.evaluate(other, with_floor=False).fid
    fid_first = rows[-1]["fid"]                                  # sample_steps are sorted: the last is the most
    seed_check = {"sample_steps": most, "seeds": [args.seed, args.seed + len(captions)], "fid": [fid_first, fid_other],
                  "difference": abs(fid_first - fid_other)}
    print(f"  seed check at {most} steps: FID {fid_first:.2f} and {fid_other:.2f} from other noise", flush=True)
    return rows, seed_check


def references(data: dict, args, judge) -> dict:
    """The caption-matched floor, the VAE ceiling on the same training emoji, and the real images' judge top-1."""
    subs, n = data["held"].subcategories[:args.n], args.n
    floor = metrics.floor(match=subs)
    picks = metrics.floor_indices(match=subs)                     # the training emoji that floor compared
    real = data["train_images"][picks]
    through_vae = decode_latents(data["vae"], encode_latents(data["vae"], real, data["scale"]), data["scale"])
    ceiling = metrics.evaluate(through_vae, with_floor=False)
    real_judge = judged(judge[0], judge[1], data["held"].images[:n], data["held"].captions[:n])
    q = lambda x: {"fid": x.fid, "kid": x.kid_mean, "kid_std": x.kid_std, "precision": x.precision,  # noqa: E731
                   "recall": x.recall}
    return {"n": n, "matched_floor": q(floor), "vae_ceiling": q(ceiling), "real_heldout": real_judge}


def load_data(args) -> dict:
    vae, scale, _ = load_vae(shipped(SHIPPED["vae"]))
    clip, tokenizer, _ = load_clip(shipped(SHIPPED["clip"]))
    train = load_emoji(size=32, split="train")
    k = args.train_images or len(train.images)
    return {"vae": vae, "scale": scale, "width": clip.config.text.width, "train_images": train.images,
            "latents": encode_latents(vae, train.images[:k], scale),
            "cond": conditioning_for(clip, tokenizer, train.captions[:k], torch.device("cpu")),
            "held": load_emoji(size=32, split="heldout")}


def plan(names: list[str], data: dict, args) -> dict:
    """Per model: its config, parameters, FLOPs per step and per image, and the steps the budget buys."""
    out = {}
    for name in names:
        torch.manual_seed(args.seed)
        model = build(name, data["width"])
        step_flops, forward = count_flops(model, data["latents"], data["cond"], train_config(args, name, 1))
        steps = steps_for_budget(args.budget_tflop, step_flops)
        out[name] = {"family": FAMILIES[MODELS[name][0]], "preset": MODELS[name][1], "changes": MODELS[name][2],
                     "config": json.loads(model.config.to_json()), "params": count_parameters(model),
                     "train_flops_per_step": step_flops, "forward_gflop_per_image": forward / 1e9, "steps": steps,
                     "train_flops": steps * step_flops, "lr": train_config(args, name, 1).lr}
    return out


def train_and_measure(name: str, entry: dict, data: dict, args, run_dir: Path, judge) -> dict:
    config = train_config(args, name, entry["steps"])
    state = run_dir / f"{name}.train.safetensors"
    check_resumable(state, config)
    torch.manual_seed(args.seed)
    trainer = Trainer(build(name, data["width"]), data["latents"], config, device=args.device,
                      conditioning=data["cond"])
    trainer.train(checkpoint_path=state, checkpoint_every=args.checkpoint_every, progress=not args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.save_dir) if args.save_dir else Path(tmp)
        info = {"bench": "scripts/bench_backbones.py", "model": name, "budget_tflop": args.budget_tflop}
        path = trainer.export(folder / f"{name}.safetensors", info=info, overwrite=not args.save_dir)
        pipe = TextToImage.from_files(path, shipped(SHIPPED["clip"]), shipped(SHIPPED["vae"]), device=args.device)
        rows, seed_check = measure(pipe, data["held"].captions[:args.n], args, judge)
    last = trainer.losses[-50:]
    return {**entry, "machine": describe_machine(args.device), "train_seconds": trainer.seconds,
            "final_loss": sum(last) / len(last) if last else None, "rows": rows, "seed_check": seed_check}


def time_sampling(trainer: Trainer, captions: list[str], args) -> tuple[float, float]:
    """Seconds per image of a generate call's fixed part (text, decoding) and of one Euler step, from 1 and 3 steps."""
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = TextToImage.from_files(trainer.export(Path(tmp) / "model.safetensors"), shipped(SHIPPED["clip"]),
                                      shipped(SHIPPED["vae"]), device=args.device)
        for steps in (1, 3):
            t0 = time.perf_counter()
            pipe.generate(captions, seed=args.seed, steps=steps, guidance_scale=args.guidance, sampler="euler")
            seconds.append((time.perf_counter() - t0) / len(captions))
    per_step = (seconds[1] - seconds[0]) / 2
    return max(0.0, seconds[0] - per_step), per_step


def estimate(names: list[str], entries: dict, data: dict, args) -> None:
    """Times --estimate-steps training steps and two short sampling calls per model, and prints the run's expected
    duration: the steps the budget buys, and every generate call of the measurement (--sample-steps and the seed
    check) for the n captions."""
    print(f"{'model':12s} {'GFLOP/step':>10s} {'s/step':>7s} {'GFLOP/s':>7s} {'steps':>6s} {'train min':>9s} "
          f"{'sample min':>10s}")
    total, captions = 0.0, data["held"].captions[:min(args.n, 256)]   # a full generate batch
    runs, euler_steps = len(args.sample_steps) + 1, sum(args.sample_steps) + max(args.sample_steps)
    for name in names:
        e = entries[name]
        torch.manual_seed(args.seed)
        trainer = Trainer(build(name, data["width"]), data["latents"], train_config(args, name, 10 ** 6),
                          device=args.device, conditioning=data["cond"])
        trainer.train_step()                                     # the first step pays for allocation
        t0 = time.perf_counter()
        for _ in range(args.estimate_steps):
            trainer.train_step()
        per_step = (time.perf_counter() - t0) / args.estimate_steps
        fixed, per_euler = time_sampling(trainer, captions, args)
        train_s, sample_s = e["steps"] * per_step, args.n * (runs * fixed + euler_steps * per_euler)
        total += train_s + sample_s
        print(f"{name:12s} {e['train_flops_per_step'] / 1e9:10.2f} {per_step:7.3f} "
              f"{e['train_flops_per_step'] / per_step / 1e9:7.1f} {e['steps']:6d} {train_s / 60:9.1f} "
              f"{sample_s / 60:10.1f}", flush=True)
    print(f"estimated duration at {args.budget_tflop:g} TFLOP per model: {total / 60:.0f} min of training and sampling "
          f"on {describe_machine()} (plus about a minute of loading, floors and judging)")


def verdict(models: dict, noise: float) -> list[str]:
    """The verdict's lines, from each model's FID at the most sampling steps (rule in the module's docstring)."""
    fid = {n: [r for r in m["rows"] if r["sample_steps"] == m["seed_check"]["sample_steps"]][0]["fid"]
           for n, m in models.items()}
    steps = next(iter(models.values()))["seed_check"]["sample_steps"]
    families: dict[str, list[str]] = {}
    for n in sorted(models, key=lambda n: models[n]["forward_gflop_per_image"]):
        families.setdefault(models[n]["family"], []).append(n)
    lines = [f"rule: FID at {steps} Euler steps; a difference counts when it exceeds {noise:.2f} ({NOISE_FACTOR:g}x "
             f"the largest FID difference between two sample seeds of one model: sampling noise only)"]

    def compare(picked: dict[str, str], what: str) -> None:
        ranked = sorted(picked.items(), key=lambda fn: fid[fn[1]])
        (f1, a), (f2, b) = ranked[0], ranked[1]
        gap = fid[b] - fid[a]
        lines.append(f"{what}: " + " < ".join(f"{f} ({n}, FID {fid[n]:.2f})" for f, n in ranked) + ": "
                     + (f"{f1} is better than {f2} by {gap:.2f}, beyond the noise" if gap > noise else
                        f"{f1} and {f2} lie within the noise ({gap:.2f} <= {noise:.2f}): no winner at this budget"))

    if len(families) >= 2:
        largest = {f: ns[-1] for f, ns in families.items()}
        best = {f: min(ns, key=fid.get) for f, ns in families.items()}
        compare(largest, "largest model of each family")
        if best != largest:
            compare(best, "best model of each family")
    for f, ns in families.items():
        if len(ns) < 2:
            continue
        changes = [fid[b] - fid[a] for a, b in zip(ns, ns[1:])]     # FID from each size to the next larger
        trend = ("improves with size" if all(d < -noise for d in changes) else
                 "worsens with size" if all(d > noise for d in changes) else "no clear trend with size")
        points = ", ".join(f"{n} {models[n]['forward_gflop_per_image']:.3f} GFLOP/img -> FID {fid[n]:.2f}"
                           for n in ns)
        held = {"improves with size": "holds", "worsens with size": "is contradicted"}.get(trend, "is not resolved")
        paper = ("" if f == "U-Net" else
                 f"; the DiT paper's finding (a bigger transformer ends better at equal compute) {held} here")
        lines.append(f"{f}: quality {trend} at equal training FLOPs ({points}){paper}")
    return lines


def table(record: dict) -> str:
    head = (f"{'model':12s} {'family':6s} {'params':>7s} {'fwd GFLOP/img':>13s} {'GFLOP/step':>10s} {'steps':>6s} "
            f"{'train TFLOP':>11s} {'train s':>8s} {'Euler':>5s} {'FID':>7s} {'KID':>7s} {'prec':>5s} {'recall':>6s} "
            f"{'judge top-1':>11s} {'s/img':>6s}")
    lines = [head]
    for name, m in record["models"].items():
        for r in m["rows"]:
            lines.append(f"{name:12s} {m['family']:6s} {m['params'] / 1e6:6.2f}M {m['forward_gflop_per_image']:13.4f} "
                         f"{m['train_flops_per_step'] / 1e9:10.2f} {m['steps']:6d} {m['train_flops'] / 1e12:11.3f} "
                         f"{m['train_seconds']:8.0f} {r['sample_steps']:5d} {r['fid']:7.2f} {r['kid']:7.4f} "
                         f"{r['precision']:5.2f} {r['recall']:6.2f} {r['judge_top1']:11.3f} "
                         f"{r['seconds_per_image']:6.3f}")
    ref = record["references"]
    for label, key in (("caption-matched floor (real training emoji)", "matched_floor"),
                       ("VAE ceiling (those emoji through the VAE)", "vae_ceiling")):
        q = ref[key]
        lines.append(f"{label:84s} {q['fid']:7.2f} {q['kid']:7.4f} {q['precision']:5.2f} {q['recall']:6.2f}")
    lines.append(f"{'real held-out images':118s} {ref['real_heldout']['judge_top1']:11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list of {', '.join(MODELS)} "
                   f"(default {DEFAULT_MODELS})")
    p.add_argument("--dit", action="store_true", help=f"add the DiTs ({DITS}) to --models")
    p.add_argument("--budget-tflop", type=float, default=15.0, help="training TFLOPs per model (forward and "
                   "backward); the default makes the 4 default models about 40 min on one CPU thread (--estimate)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr-unet", type=float, default=3e-4)
    p.add_argument("--lr-transformer", type=float, default=3e-4, help="the MMDiTs' and DiTs'")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up, the same for every model")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped up early: course_lib.loop.ema_decay_at)")
    p.add_argument("--timestep-shift", type=float, default=1.0, help="SD 3's shift of the flow's times (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=398, help="held-out captions, one image each (the first n)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sample-steps", default="4,8,20", help="Euler step counts")
    p.add_argument("--train-images", type=int, default=None, help="the first k training emoji (default: all)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", default=None, help=f"training checkpoints (default {RUN_DIR.relative_to(ROOT)}; "
                   "quick: a temporary folder)")
    p.add_argument("--save-dir", default=None, help="keep each model's file here (<name>.safetensors)")
    p.add_argument("--out", default=None, help=f"the record (default {RECORD.relative_to(ROOT)}; quick: none)")
    p.add_argument("--estimate", action="store_true", help="count FLOPs, time a few steps, print the run's duration")
    p.add_argument("--estimate-steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tiny budget on a few images: checks the code path")
    args = p.parse_args(argv)
    try:
        names = parse_models(args.models + ("," + DITS if args.dit else ""))
        args.sample_steps = sorted({int(s) for s in args.sample_steps.split(",")})
    except ValueError as error:
        p.error(str(error))
    if args.quick:
        args.budget_tflop, args.batch, args.warmup, args.n = 0.004, 8, 2, 16
        args.sample_steps, args.train_images, args.checkpoint_every = [2, 4], 64, 5
    torch.set_num_threads(args.threads)
    out = args.out or (None if args.quick else str(RECORD))
    settings = {k: getattr(args, k) for k in ("budget_tflop", "batch", "lr_unet", "lr_transformer", "warmup", "ema",
                                              "timestep_shift", "seed", "n", "guidance", "sample_steps",
                                              "train_images", "quick")}
    settings |= {"objective": "flow", "timestep_sampling": "logit_normal", "caption_dropout": 0.1, "sampler": "euler"}
    # the shipped VAE and mini CLIP every model trains and samples through: a record made with other files is not reused
    settings["shipped"] = shipped_identity((SHIPPED["vae"], SHIPPED["clip"]))

    data = load_data(args)
    entries = plan(names, data, args)
    for name, e in entries.items():
        print(f"{name:12s} {e['family']:6s} {e['params'] / 1e6:.2f}M params, {e['train_flops_per_step'] / 1e9:.2f} "
              f"GFLOP a training step (batch {args.batch}), {e['forward_gflop_per_image']:.4f} GFLOP a forward per "
              f"image: {e['steps']} steps for {args.budget_tflop:g} TFLOP", flush=True)
    if args.estimate:
        return estimate(names, entries, data, args)

    given = sys.argv[1:] if argv is None else argv
    record = {"command": " ".join(["python", "scripts/bench_backbones.py"] + given),
              "machine": describe_machine(args.device, detail=True), "torch": torch.__version__,
              "threads": args.threads, "settings": settings, "models": {}}
    old_references = None
    if out and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        if old.get("settings") == settings:
            record["models"] = old.get("models", {})
            record["command"] = old.get("command", "") + "; " + record["command"]
            old_references = old.get("references")
        else:
            print(f"{out} holds a run with other settings; it is kept as {keep_earlier(out)}", flush=True)
    judge = load_clip(shipped("clip_judge"), device=args.device)[:2]
    def cached(name):
        model = record["models"].get(name)
        return bool(model) and all(model.get(k) == v for k, v in entries[name].items())

    # the references (floor, VAE ceiling, real emoji's judge score) depend on the settings alone: kept with the models
    all_cached = all(cached(n) for n in names)
    record["references"] = old_references if all_cached and old_references else references(data, args, judge)
    run_dir = Path(args.run_dir) if args.run_dir else RUN_DIR
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) if args.quick and not args.run_dir else run_dir
        for name in names:
            if cached(name):
                print(f"{name}: measured by an earlier run with these settings (in {out}); skipped", flush=True)
                continue
            print(f"{name}: training {entries[name]['steps']} steps", flush=True)
            record["models"][name] = train_and_measure(name, entries[name], data, args, run_dir, judge)
            if out:
                write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    record["models"] = {n: record["models"][n] for n in names} | record["models"]   # this run's order first
    noise = NOISE_FACTOR * max(m["seed_check"]["difference"] for m in record["models"].values())
    record["noise_threshold"] = noise
    record["verdict"] = verdict(record["models"], noise)
    record["table"] = table(record)
    print(f"\n{record['machine']}\n{record['table']}\n")
    rates = ", ".join(f"{n} {m['train_seconds']:.0f} s ({m['train_flops'] / max(m['train_seconds'], 1e-9) / 1e9:.0f} "
                      f"GFLOP/s)" for n, m in record["models"].items())
    print(f"equal-time view: the budget took {rates} of training on this machine")
    for line in record["verdict"]:
        print(f"verdict: {line}")
    if out:
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
