"""Train and measure the course's ControlNet on the shipped tiny SD (notebook 17).

    python scripts/train_controlnet.py --max-minutes 120     # train (resumes from runs/controlnet/), export, measure
    python scripts/train_controlnet.py --measure-only        # measure the shipped file again, rewrite card and record
    python scripts/train_controlnet.py --quick --out-dir /tmp/cn   # seconds: the same code on a few images

The ControlNet (course_lib.controlnet: a trainable copy of the tiny SD's encoder, a hint encoder and zero
convolutions) learns to follow a control image made from each training emoji (--control, default Sobel edges,
course_lib.controls), with the tiny SD's own denoising loss, half the captions dropped (Zhang et al.), the U-Net
frozen: `fit_controlnet`, through the course's one loop, checkpointed under --run-dir.

It writes checkpoints/controlnet_<control>.safetensors in 8 bits a weight (course_lib.quantize.save_8bit: the
float16 file, 4.4 MB, would not fit the repository's budget), its card, and results/controlnet_<control>.json.
Measured on the first --n held-out emoji, with their captions, 20 DDIM steps, the tiny SD's guidance:
    follows     the output's own control image against the one it was given (course_lib.controls.agreement: the
                IoU of the white pixels), at each conditioning scale; scale 0 is the base model (the floor);
    ceiling     the real emoji through the VAE, the best a latent model can draw; and another real emoji against
                this one's control (what merely being an emoji gives);
    FID         against the held-out emoji with the caption-matched floor; the independent judge's top-1;
    8-bit       the same images from the float32 weights before saving and from the 8-bit file: their largest
                pixel difference and both agreement scores.
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

from course_lib import checkpoint as ckpt, controls, metrics  # noqa: E402
from course_lib.clip import load_clip, retrieval_accuracy, similarity  # noqa: E402
from course_lib.controlnet import ControlNet, fit_controlnet, latent_factor, with_control  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.pipeline import TextToImage  # noqa: E402
from course_lib.plotting import save_grid_png  # noqa: E402
from course_lib.quantize import read_8bit, save_8bit  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402
from shipping import add_arguments, refuse_to_replace, write_record_and_card  # noqa: E402
from course_lib.vae import encode_latents  # noqa: E402


def command() -> str:
    return " ".join(["python", "scripts/train_controlnet.py"] + sys.argv[1:])


def load_shipped_controlnet(path: Path, pipe: TextToImage) -> tuple[ControlNet, dict]:
    """The ControlNet in `path` (save_8bit) for pipe's U-Net, in eval mode, with the file's info."""
    state, info = read_8bit(path)
    net = ControlNet.from_unet(pipe.unet, latent_factor(pipe))
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), info


def train(args, pipe: TextToImage, out: Path) -> ControlNet:
    refuse_to_replace(out, args.replace)
    data = load_emoji(size=32, split="train", limit=args.train_images)
    hints = controls.make_control(data.images, args.control)
    state = Path(args.run_dir) / f"controlnet_{args.control}.train.safetensors"
    net, log = fit_controlnet(pipe, data.images, data.captions, hints, steps=args.steps, batch_size=args.batch,
                              lr=args.lr, seed=args.seed, checkpoint_path=state, checkpoint_every=200,
                              max_seconds=args.max_minutes * 60 if args.max_minutes else None,
                              progress=not args.no_progress)
    info = {"control": args.control, "steps": log.steps, "train_seconds": round(log.seconds, 1),
            "batch": args.batch, "lr": args.lr, "machine": describe_machine(args.device), "command": command(),
            "base": "tiny_sd_emoji", "trainable": log.trainable, "train_images": len(data.captions),
            "guidance": pipe.sampler_settings.guidance_scale}
    save_8bit(out, {k: v.float() for k, v in net.state_dict().items()}, info=info)
    print(f"ControlNet on {args.control}: {log.steps} steps in {log.seconds:.0f} s -> {out}", flush=True)
    return net


def evaluate(args, pipe: TextToImage, out: Path, trained: ControlNet | None) -> dict:
    net, info = load_shipped_controlnet(out, pipe)
    held = load_emoji(size=32, split="heldout")
    images, captions, subs = held.images[:args.n], held.captions[:args.n], held.subcategories[:args.n]
    judge, tokenizer, _ = load_clip(ckpt.shipped("clip_judge"))
    top1 = lambda x: retrieval_accuracy(similarity(judge, tokenizer, x, captions), ks=(1,))[1]  # noqa: E731
    given = controls.make_control(images, args.control)
    follows = lambda x: controls.agreement(controls.make_control(x, args.control), given,  # noqa: E731
                                           args.control).mean().item()
    through_vae = pipe.decode(encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device))
    record = {"command": command(), "machine": describe_machine(args.device), "torch": torch.__version__,
              "n": args.n, "sample_steps": args.sample_steps, "model": info, "rows": [],
              "ceiling": {"follows": follows(through_vae), "fid": metrics.evaluate(through_vae, with_floor=False).fid,
                          "judge_top1": top1(through_vae)},
              "another_emoji": follows(images.roll(args.n // 2, 0)),   # a distant emoji: neighbours are alike
              "floor": {"fid": metrics.floor(match=subs).fid, "judge_top1": top1(images)}}
    outputs = {}
    for only in (False, True):            # the control on both passes of guidance, or on the conditional one only
        for scale in args.scales:
            if only and scale == 0:
                continue                  # scale 0 is the base model either way
            t0 = time.perf_counter()
            x = with_control(pipe, net, given, scale, conditional_only=only)(captions, seed=args.seed,
                                                                             steps=args.sample_steps)
            outputs[(scale, only)] = x
            q = metrics.evaluate(x, with_floor=False)
            record["rows"].append({"scale": scale, "conditional_only": only, "follows": follows(x), "fid": q.fid,
                                   "precision": q.precision, "recall": q.recall, "judge_top1": top1(x),
                                   "seconds_per_image": (time.perf_counter() - t0) / len(captions)})
            print(f"  scale {scale:g}{', conditional pass only' if only else ''}: follows "
                  f"{record['rows'][-1]['follows']:.3f}, FID {q.fid:.2f}", flush=True)
    for text, ctrl in args.guidance_pairs:   # guidance by each condition: three passes a step (ControlGuidedUNet)
        t0 = time.perf_counter()
        x = with_control(pipe, net, given, 1.0, guidance=(text, ctrl))(captions, seed=args.seed,
                                                                       steps=args.sample_steps)
        outputs[("guidance", text, ctrl)] = x
        q = metrics.evaluate(x, with_floor=False)
        record["rows"].append({"scale": 1.0, "conditional_only": False, "guidance": [text, ctrl], "follows": follows(x),
                               "fid": q.fid, "precision": q.precision, "recall": q.recall, "judge_top1": top1(x),
                               "seconds_per_image": (time.perf_counter() - t0) / len(captions)})
        print(f"  scale 1, guidance text {text:g} / control {ctrl:g}: follows {record['rows'][-1]['follows']:.3f}, "
              f"FID {q.fid:.2f}", flush=True)
    record["empty_prompt"] = {str(scale): follows(with_control(pipe, net, given, scale)([""] * len(captions),
                                                                                     seed=args.seed,
                                                                                     steps=args.sample_steps))
                              for scale in (0.0, 1.0)}        # the control alone: was it learned?
    print(f"  empty prompt: follows {record['empty_prompt']['0.0']:.3f} at scale 0, "
          f"{record['empty_prompt']['1.0']:.3f} at scale 1", flush=True)
    if trained is not None:     # the float32 weights before saving against the 8-bit file, on the same images
        k = min(32, args.n)
        full = with_control(pipe, trained.eval(), given[:k], 1.0)(captions[:k], seed=args.seed,
                                                                   steps=args.sample_steps)
        eight = with_control(pipe, net, given[:k], 1.0)(captions[:k], seed=args.seed, steps=args.sample_steps)
        record["eight_bit"] = {"images": k, "max_pixel_difference": (full - eight).abs().max().item(),
                               "follows_float32": controls.agreement(controls.make_control(full, args.control),
                                                                     given[:k], args.control).mean().item(),
                               "follows_8bit": controls.agreement(controls.make_control(eight, args.control),
                                                                  given[:k], args.control).mean().item()}
    k = min(16, args.n)
    rows = [images[:k], given[:k], outputs[(min(args.scales), False)][:k], outputs[(max(args.scales), False)][:k],
            outputs[(1.0 if 1.0 in args.scales else max(args.scales), True)][:k]]
    save_grid_png(torch.cat(rows), Path(args.out_dir) / f"controlnet_{args.control}_samples.png", columns=k)
    return record


def control_on(row: dict) -> str:
    """How a row applied the control under guidance, for the card's table."""
    if "guidance" in row:
        return f"guidance text {row['guidance'][0]:g}, control {row['guidance'][1]:g} (3 passes)"
    return "conditional pass" if row.get("conditional_only") else "both passes"


def card(record: dict, name: str) -> str:
    m, ceil = record["model"], record["ceiling"]
    lines = [f"# {name}: a ControlNet on {m['control']} for the tiny SD", "",
             f"A trainable copy of tiny_sd_emoji's encoder with a hint encoder and zero convolutions "
             f"(course_lib.controlnet, {m['trainable']:,} numbers), trained on control images made from the "
             f"{m['train_images']:,} training emoji (course_lib.controls, {m['control']}), the tiny SD frozen, half the captions "
             f"dropped: {m['steps']:,} steps of {m['batch']} at lr {m['lr']:g} in "
             f"{m['train_seconds'] / 3600:.2f} CPU-hours on {m['machine']}.", "",
             "Stored in 8 bits a weight (course_lib.quantize.save_8bit; load with "
             "course_lib.quantize.read_8bit and ControlNet.from_unet(...).load_state_dict).", "",
             f"Command: `{m['command']}`; measured by `{record['command']}` on {record['machine']}, torch "
             f"{record['torch']}.", "",
             f"Measured on the first {record['n']} held-out emoji with their captions and their own control images, "
             f"{record['sample_steps']} DDIM steps, guidance {m['guidance']:g} (image k from seed k). *Follows*: the output's own "
             f"{m['control']} map against the given one, IoU of their pixels (course_lib.controls.agreement).", "",
             "| conditioning scale | control on | follows | FID | precision | recall | judge top-1 | s/image |",
             "|---|---|---|---|---|---|---|---|",
             *[f"| {r['scale']:g} | {control_on(r)} | "
               f"{r['follows']:.3f} | {r['fid']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} | "
               f"{r['judge_top1']:.3f} | {r['seconds_per_image']:.3f} |" for r in record["rows"]],
             f"| real emoji through the VAE (ceiling) | | {ceil['follows']:.3f} | {ceil['fid']:.2f} | | | "
             f"{ceil['judge_top1']:.3f} | |",
             f"| another real emoji's map | | {record['another_emoji']:.3f} | | | | | |",
             f"| real training emoji, caption-matched (FID floor) | | | {record['floor']['fid']:.2f} | | | "
             f"{record['floor']['judge_top1']:.3f} (held-out) | |", "",
             "Scale 0 is the tiny SD without control (the floor of *follows*). *Control on*: both passes of "
             "classifier-free guidance (as trained), or the conditional pass only (`with_control(..., "
             "conditional_only=True)`: the empty prompt's pass runs without it, so the guided difference carries the "
             "control), or guidance by each condition (`with_control(..., guidance=(text, control))`: "
             "e(null, -) + s_c [e(null, control) - e(null, -)] + s_t [e(text, control) - e(null, control)], three "
             "passes a step; (4, 4) is the conditional pass only at guidance 4). The judge (checkpoints/clip_judge) never conditioned the model."]
    if "empty_prompt" in record:
        e = record["empty_prompt"]
        lines += ["", f"The same controls with the empty prompt (the control alone; half the training captions were "
                      f"dropped): follows {e['0.0']:.3f} at scale 0, {e['1.0']:.3f} at scale 1. Where this rises and the "
                      f"captioned rows do not, the control is learned and the caption with classifier-free guidance "
                      f"overrides it (the ControlNet steers the conditional and the unconditional pass alike)."]
    if "eight_bit" in record:
        e = record["eight_bit"]
        lines += ["", f"8 bits against float32, on {e['images']} images at scale 1: largest pixel difference "
                      f"{e['max_pixel_difference']:.3f} (images in [-1, 1]); follows {e['follows_8bit']:.3f} "
                      f"against {e['follows_float32']:.3f}."]
    lines += ["", f"![rows: held-out emoji, their {m['control']} maps, the tiny SD without control, with control at "
                  f"scale {max(r['scale'] for r in record['rows']):g} on both passes, at scale 1 on the conditional pass only]"
                  f"({name}_samples.png)", "",
              "Licence: derived from Noto Emoji images (Apache-2.0); see data/emoji/LICENSES.md.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", default="edges", choices=controls.CONTROLS)
    add_arguments(p, steps=20000, run_dir=str(ROOT / "runs" / "controlnet"), record=None,
                  record_help="default results/controlnet_<control>.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scales", default="0,0.5,1,2")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance-pairs", default="4,8;2,4;1,4",
                   help="(text scale, control scale) pairs measured with guidance by each condition, ';'-separated")
    args = p.parse_args(argv)
    args.scales = sorted({float(s) for s in args.scales.split(",")})
    args.guidance_pairs = [tuple(float(v) for v in pair.split(",")) for pair in args.guidance_pairs.split(";") if pair]
    if args.quick:
        args.steps, args.train_images, args.n, args.sample_steps, args.batch = 3, 16, 8, 2, 4
        args.guidance_pairs = args.guidance_pairs[:1]
    torch.set_num_threads(args.threads)
    name = f"controlnet_{args.control}"
    out = Path(args.out_dir) / f"{name}.safetensors"
    record_path = Path(args.record) if args.record else ROOT / "results" / f"{name}.json"
    pipe = TextToImage.from_shipped(device=args.device)
    trained = None if args.measure_only else train(args, pipe, out)
    record = evaluate(args, pipe, out, trained)
    if trained is None and record_path.is_file():      # --measure-only: the 8-bit check needs the float32 weights,
        earlier = json.loads(record_path.read_text())  # which only training has; keep the training run's
        if "eight_bit" in earlier:
            record["eight_bit"] = {**earlier["eight_bit"], "measured_by": earlier.get("command")}
    write_record_and_card(record_path, Path(args.out_dir) / f"{name}.md", record, card(record, name))


if __name__ == "__main__":
    main()
