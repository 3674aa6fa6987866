"""Train what notebooks 10 and 12 load: a Twemoji-style LoRA for the tiny SD, and the HyperDreamBooth hypernetwork.

    python scripts/train_personalisation.py                  # every stage, then the cards
    python scripts/train_personalisation.py --stage lora     # one stage: lora, preopt, hyper or cards
    python scripts/train_personalisation.py --quick --out-dir /tmp/p   # seconds-long run of the same code

Stages (each skips itself when its output exists; delete the output to redo it):
    lora    rank-4 LoRA on the attention projections of checkpoints/tiny_sd_emoji, trained on the
            train-split Twemoji images with their captions -> checkpoints/lora_twemoji.safetensors
    preopt  LiDB weights for each of the 271 training subjects (emoji with six skin tones), all
            optimised at once -> runs/lidb_preopt.safetensors (not shipped: 271 x 6,000 numbers)
    hyper   the hypernetwork (image encoder from the mini CLIP + a 2-block transformer decoder, 4
            refinement passes) trained on those subjects -> checkpoints/hyperdreambooth.safetensors
    cards   measure both and write checkpoints/lora_twemoji.md and checkpoints/hyperdreambooth.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import checkpoint as ckpt  # noqa: E402
from course_lib import dreambooth as db  # noqa: E402
from course_lib import hyperdreambooth as hd  # noqa: E402
from course_lib import lora  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.metrics import features, fid, subject_similarity  # noqa: E402
from course_lib.pipeline import SHIPPED, TextToImage  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402

STAGES = ("lora", "preopt", "hyper", "cards")


def base_pipeline(args) -> TextToImage:
    """The tiny SD the adapters are trained for: the shipped one, or the stack in --base-dir (a retrained VAE,
    CLIP and U-Net not shipped yet, e.g. runs/s3/ckpt)."""
    if args.base_dir is None:
        return TextToImage.from_shipped(device=args.device)
    folder = Path(args.base_dir)
    return TextToImage.from_files(*(folder / f"{SHIPPED[k]}.safetensors" for k in ("unet", "clip", "vae")),
                                  device=args.device)
LIDB_SEED = 0


def command() -> str:
    return " ".join(["python", "scripts/train_personalisation.py"] + sys.argv[1:])


def results_path(args) -> Path:
    return Path(args.out_dir) / "personalisation_results.json"


def update_results(args, key: str, value) -> None:
    path = results_path(args)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    ckpt.write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def stage_lora(args) -> None:
    out = Path(args.out_dir) / "lora_twemoji.safetensors"
    if out.exists():
        print(f"lora: {out} exists, skipping")
        return
    pipe = base_pipeline(args)
    data = load_emoji(size=32, split="train", style="twemoji")
    n = 64 if args.quick else len(data)
    log = lora.fit_lora(pipe, data.images[:n], data.captions[:n], rank=args.lora_rank,
                        steps=5 if args.quick else args.lora_steps, batch_size=args.lora_batch, lr=args.lora_lr,
                        seed=args.seed, progress=not args.no_progress)
    res = {"losses": log.losses, "seconds": log.seconds, "steps": log.steps}
    info = {"command": command(), "machine": describe_machine(), "rank": args.lora_rank,
            "steps": res["steps"], "batch_size": args.lora_batch, "lr": args.lora_lr, "seconds": round(res["seconds"], 1),
            "final_loss": sum(res["losses"][-50:]) / len(res["losses"][-50:]), "base": "tiny_sd_emoji"}
    lora.save_lora(out, pipe.unet, info=info)
    update_results(args, "lora_train", info)
    print(f"lora: {res['steps']} steps in {res['seconds']:.0f} s -> {out}")


def stage_preopt(args) -> None:
    out = Path(args.run_dir) / "lidb_preopt.safetensors"
    if out.exists():
        print(f"preopt: {out} exists, skipping")
        return
    pipe = hd.personal_pipeline(base_pipeline(args))
    lidb = hd.LiDB(pipe.unet, seed=LIDB_SEED)
    subjects = db.emoji_subjects("train")[: 8 if args.quick else None]
    data = hd.subject_data(pipe, subjects)
    res = hd.fit_lidb(pipe, lidb, data, steps=5 if args.quick else args.preopt_steps, batch_size=args.preopt_batch,
                      lr=args.preopt_lr, seed=args.seed, progress=not args.no_progress)
    info = {"command": command(), "subjects": len(subjects), "steps": res.steps, "seconds": round(res.seconds, 1),
            "batch_size": args.preopt_batch, "lr": args.preopt_lr,
            "first_loss": sum(res.losses[:20]) / len(res.losses[:20]),
            "final_loss": sum(res.losses[-50:]) / len(res.losses[-50:])}
    ckpt.atomic_save({"weights": res.weights.float()}, out, {"info": json.dumps(info),
                                                             "subjects": json.dumps([s.name for s in subjects])})
    update_results(args, "lidb_preopt", info)
    print(f"preopt: {len(subjects)} subjects, {res.steps} steps in {res.seconds:.0f} s -> {out}")


def stage_hyper(args) -> None:
    out = Path(args.out_dir) / "hyperdreambooth.safetensors"
    if out.exists():
        print(f"hyper: {out} exists, skipping")
        return
    base = base_pipeline(args)
    pipe = hd.personal_pipeline(base)
    lidb = hd.LiDB(pipe.unet, seed=LIDB_SEED)
    tensors, meta = ckpt.read(Path(args.run_dir) / "lidb_preopt.safetensors")
    names = json.loads(meta["subjects"])
    subjects = {s.name: s for s in db.emoji_subjects("train")}
    data = hd.subject_data(pipe, [subjects[n] for n in names])
    torch.manual_seed(args.seed)
    hyper = hd.HyperNetwork(hd.hyper_config_for(lidb, image=base.clip.config.image)).to(args.device)
    hyper.image.load_state_dict(base.clip.image.state_dict())       # start from the mini CLIP's image tower
    res = hd.train_hypernetwork(hyper, pipe, lidb, data, tensors["weights"], steps=5 if args.quick else args.hyper_steps,
                                batch_size=args.hyper_batch, lr=args.hyper_lr, weight_loss=args.weight_loss,
                                seed=args.seed, progress=not args.no_progress)
    info = {"command": command(), "machine": describe_machine(), "subjects": len(names),
            "steps": res.steps, "batch_size": args.hyper_batch, "lr": args.hyper_lr, "weight_loss": args.weight_loss,
            "seconds": round(res.seconds, 1), "parameters": sum(p.numel() for p in hyper.parameters()),
            "final_diffusion_loss": sum(res.diffusion[-50:]) / len(res.diffusion[-50:]),
            "final_weight_loss": sum(res.weight[-50:]) / len(res.weight[-50:])}
    hd.save_hypernetwork(out, hyper, lidb.config, LIDB_SEED, info=info)
    update_results(args, "hyper_train", info)
    print(f"hyper: {res.steps} steps in {res.seconds:.0f} s -> {out}")


@torch.no_grad()
def stage_cards(args) -> None:
    out_dir = Path(args.out_dir)
    results = json.loads(results_path(args).read_text())
    n = 64 if args.quick else 398
    # LoRA: FID to held-out Twemoji, base vs adapted, with the floor
    pipe = base_pipeline(args)
    held = load_emoji(size=32, split="heldout", style="twemoji")
    train = load_emoji(size=32, split="train", style="twemoji")
    ref = features(held.images[:n])
    floor = fid(features(train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]), ref)
    prompts = held.captions[:n]
    base_img = torch.cat([pipe(prompts[i:i + 128], seed=i, steps=20, guidance_scale=3.0) for i in range(0, n, 128)])
    meta = lora.load_lora(out_dir / "lora_twemoji.safetensors", pipe.unet)
    lora_img = torch.cat([pipe(prompts[i:i + 128], seed=i, steps=20, guidance_scale=3.0) for i in range(0, n, 128)])
    noto = load_emoji(size=32, split="heldout", style="noto")
    ref_noto = features(noto.images[:n])
    lora_eval = {"n": n, "floor": floor, "noto_same_emoji_fid": fid(ref_noto, ref),
                 "base_fid": fid(features(base_img), ref), "lora_fid": fid(features(lora_img), ref),
                 "base_fid_noto": fid(features(base_img), ref_noto), "lora_fid_noto": fid(features(lora_img), ref_noto),
                 "adapter_numbers": lora.adapter_numbers(pipe.unet),
                 "file_bytes": (out_dir / "lora_twemoji.safetensors").stat().st_size}
    update_results(args, "lora_eval", lora_eval)
    t = meta["info"]
    ckpt.write_text_atomic(out_dir / "lora_twemoji.md", f"""# lora_twemoji: the tiny SD in Twemoji's style

A rank-{meta['rank']} LoRA (alpha {meta['alpha']:g}) on the U-Net's attention projections ({len(meta['layers'])} layers,
{lora_eval['adapter_numbers']:,} numbers, {lora_eval['file_bytes'] / 1024:.0f} KiB in float16), on top of `tiny_sd_emoji`.
Notebook 10 loads it for the LoRA-scale slider.

- **Command**: `{t['command']}`
- **Data**: the {len(train)} train-split Twemoji images (32 px) with their captions, 10% dropped to "".
- **Training**: {t['steps']} steps of {t['batch_size']}, AdamW lr {t['lr']}, seed {args.seed}, {t['seconds']:.0f} s on {t['machine']}.
- **Measured** (`python scripts/train_personalisation.py --stage cards`): FID to the {n} held-out Twemoji images
  (held-out captions as prompts, DDIM 20 steps, guidance 3), in the feature net's space:

  | images | FID to held-out Twemoji | FID to held-out Noto |
  |---|---|---|
  | base tiny SD | {lora_eval['base_fid']:.2f} | {lora_eval['base_fid_noto']:.2f} |
  | with this LoRA (scale 1) | {lora_eval['lora_fid']:.2f} | {lora_eval['lora_fid_noto']:.2f} |
  | real Noto images of the same {n} emoji | {lora_eval['noto_same_emoji_fid']:.2f} | (the reference) |
  | real Twemoji images of {n} *other* emoji (train split): the floor | {floor:.2f} | |

  {"The LoRA moved the model closer to Twemoji" if lora_eval['lora_fid'] < lora_eval['base_fid'] else
   "The LoRA moved the model away from Noto but not closer to Twemoji"} in this feature space. This is a short CPU
  run; notebook 10 uses the adapter to show loading, the scale slider and merging, and measures the same thing.
""")
    # hypernetwork: predicted weights for held-out subjects, subject similarity before/after
    hyper, lidb_cfg, lidb_seed, hinfo = hd.load_hypernetwork(out_dir / "hyperdreambooth.safetensors", device=args.device)
    base = base_pipeline(args)
    personal = hd.personal_pipeline(base)
    lidb = hd.LiDB(personal.unet, lidb_cfg, seed=lidb_seed)
    subjects = db.emoji_subjects("heldout")[: 2 if args.quick else None]
    sims, base_sims = [], []
    for s in subjects:
        w = hyper(s.images[:1].to(args.device), lidb.init_weights(1)[0])
        lidb.set(w)
        imgs = personal([s.prompt(t) for t in db.TONES[1:]], seed=0, steps=20, guidance_scale=3.0)
        lidb.set(None)
        sims.append(subject_similarity(imgs, s.images[1:]))
        cls = base([s.prompt(t, None) for t in db.TONES[1:]], seed=0, steps=20, guidance_scale=3.0)
        base_sims.append(subject_similarity(cls, s.images[1:]))
    heval = {"subjects": len(subjects), "hyper_subject_similarity": sum(sims) / len(sims),
             "class_prompt_subject_similarity": sum(base_sims) / len(base_sims)}
    update_results(args, "hyper_eval", heval)
    p = results["lidb_preopt"]
    ckpt.write_text_atomic(out_dir / "hyperdreambooth.md", f"""# hyperdreambooth: one image -> LiDB weights for the tiny SD

A hypernetwork ({hinfo['parameters']:,} parameters) that predicts Lightweight DreamBooth weights (rank {lidb_cfg.rank},
a = {lidb_cfg.a}, b = {lidb_cfg.b}: {lidb.numbers:,} numbers over {lidb.shape[0]} attention projections) from one 32 px image.
Its image encoder started from the mini CLIP's image tower (`clip_emoji`); the decoder is 2 transformer blocks
with one query per adapted layer, run for 4 refinement passes. Notebook 12 loads it.

- **Command**: `{hinfo['command']}` (the `preopt` stage first, then `hyper`).
- **Subjects**: the {p['subjects']} train-split emoji that come in all six skin tones. A sample is one tone image,
  captioned "sks <class>: <tone> skin tone" ("sks" a new token; class person, hand or body part).
- **Pre-optimised LiDB weights**: all {p["subjects"]} subjects at once, {p["steps"]} steps of {p["batch_size"]}, SparseAdam lr {p["lr"]},
  {p['seconds']:.0f} s; loss {p['first_loss']:.4f} -> {p['final_loss']:.4f}.
- **Hypernetwork training**: {hinfo['steps']} steps of {hinfo['batch_size']}, AdamW lr {hinfo['lr']}, weight-loss factor
  {hinfo['weight_loss']}, {hinfo['seconds']:.0f} s on {hinfo['machine']}; final diffusion loss {hinfo['final_diffusion_loss']:.4f},
  weight loss {hinfo['final_weight_loss']:.5f}.
- **Measured** (`--stage cards`): on the {heval['subjects']} held-out subjects, given the default (yellow) image only, the
  five other tones generated with the predicted weights have subject similarity {heval['hyper_subject_similarity']:.3f} to the
  real five (mean cosine in the feature net's space); the base model's images for the class prompts
  ("person: dark skin tone", ...) score {heval['class_prompt_subject_similarity']:.3f}. Notebook 12 compares it with DreamBooth,
  LoRA-DreamBooth, LiDB and fast fine-tuning.
""")
    print(json.dumps({"lora_eval": lora_eval, "hyper_eval": heval}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=STAGES + ("all",))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out-dir", default=str(ROOT / "checkpoints"))
    p.add_argument("--base-dir", default=None, help="a folder holding the tiny SD to train for (default: the shipped)")
    p.add_argument("--run-dir", default=str(ROOT / "runs"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora-steps", type=int, default=800)
    p.add_argument("--lora-batch", type=int, default=64)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--preopt-steps", type=int, default=600)
    p.add_argument("--preopt-batch", type=int, default=64)
    p.add_argument("--preopt-lr", type=float, default=1e-2)
    p.add_argument("--hyper-steps", type=int, default=1500)
    p.add_argument("--hyper-batch", type=int, default=32)
    p.add_argument("--hyper-lr", type=float, default=3e-4)
    p.add_argument("--weight-loss", type=float, default=1.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        {"lora": stage_lora, "preopt": stage_preopt, "hyper": stage_hyper, "cards": stage_cards}[stage](args)


if __name__ == "__main__":
    main()
