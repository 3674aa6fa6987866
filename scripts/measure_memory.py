"""Peak GPU memory of the full-mode training, fine-tuning and sampling steps of notebooks 04-17, against 8 GiB.

    python scripts/measure_memory.py                   # needs a CUDA GPU; prints a table
    python scripts/measure_memory.py --json out.json   # and writes the rows
    python scripts/measure_memory.py --device cpu --tiny   # every row's code path at batch 2, in seconds

Each row runs the same course_lib call the notebook runs in full mode (the sizes below are the notebooks'
full-mode settings), for two optimiser steps (so AdamW's state exists), under course_lib.memory.measure_peak.
Rows whose call takes a precision are measured in fp32 and under autocast: fp16 with a GradScaler (what the
course picks on a T4, compute capability 7.5) and bf16 (what it picks from 8.0 on) where the GPU has it. The
fine-tunings of notebooks 10-12 run as the notebooks run them (fp32, no precision argument). Notebook 18's
full mode is SD 1.5 at 512 px: scripts/measure_sd15_memory.py. Notebooks 01-03 train nothing (03 times one step
per preset and prints its peak itself). `peak` is torch.cuda.max_memory_allocated, `reserved` the caching
allocator's high-water mark (closer to nvidia-smi); neither counts the CUDA context (~0.3-0.5 GiB). --tiny
cuts every batch and step count to at most 2: the code path only, for a CPU (where nothing is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import memory  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402

# The notebooks' full-mode sizes (keep in step with the notebooks' settings.choose(full=...) lines).
FULL = {
    "04": {"preset": "small", "batch": 64},
    "05": {"batch": 500, "steps": 50},
    "06": {"vae_preset": "f4c4", "batch": 64},
    "07": {"pixel_preset": "small", "latent_preset": "small", "batch": 64},
    "08": {"clip_preset": "small", "batch": 256},
    "09": {"unet_preset": "sd_small", "batch": 128, "sample_batch": 64, "sample_steps": 30, "guidance": 4.0},
    "10": {"batch": 128, "rank": 4, "sample_batch": 128, "sample_steps": 20, "guidance": 3.0},
    "11": {"batch": 4, "prior_images": 48, "prior_steps": 20, "step_batch": 8},
    "12": {"lidb_batch": 4, "demo_subjects": 16, "demo_batch": 32, "hyper_batch": 16, "fast_rank": 4,
           "step_batch": 32},
    "13": {"preset": "tiny", "batch": 64, "sample_batch": 256, "sample_steps": 32},
    "14": {"preset": "mmdit_tiny", "batch": 64},
    "15": {"n": 128, "steps": 20, "strength": 0.6, "resample": 3},
    "16": {"batch": 64, "rank": 8},          # 16 and 17: the GPU's full-mode batch (a CPU's: 32)
    "17": {"batch": 64, "control": "edges"},
}


FAILED: list[str] = []                      # rows that raised, with their errors


def precisions(device: torch.device, account: str | None = None) -> list[str]:
    """fp32, fp16 (a T4's pick) and bf16 where the GPU has it; fp32 alone on a CPU; accounted: fp32 and bf16 (a
    fake run of fp16 holds what bf16 does, two bytes a value, and its GradScaler's few scalars)."""
    if account:
        return ["fp32", "bf16"]
    if device.type != "cuda":
        return ["fp32"]
    return ["fp32", "fp16"] + (["bf16"] if torch.cuda.get_device_capability(device)[0] >= 8 else [])


def rows(device: torch.device, tiny: bool = False, only: list[str] | None = None,
         account: str | None = None, attention: str | None = None) -> list[tuple[str, memory.MemoryReport]]:
    """The measured rows; tiny: every size and step count cut to at most 2; only: notebooks' numbers to run;
    account: a GPU of course_lib.memory.GPUS to account every row for on fake tensors (with `attention`)."""
    from course_lib.checkpoint import shipped
    from course_lib.unet_file import load_model
    from course_lib.data import load_emoji
    from course_lib.train import Conditioning, TrainConfig, Trainer
    from course_lib.unet import UNet, get_preset

    out = []
    full = {k: {n: (min(v, 2) if tiny and isinstance(v, int) and n not in ("rank", "fast_rank") else v)
                for n, v in row.items()} for k, row in FULL.items()}
    emoji = load_emoji(size=32, split="train", limit=8 if tiny else None)
    latent_like = torch.randn(emoji.images.shape[0], 4, 8, 8)
    bf16 = bool(account) or memory.resolve_precision("auto", device) == "bf16"   # fit_vae / fit_clip: fp32 or bf16

    def attempt(name, fn):
        if only is not None and name[:2] not in only:
            return
        try:
            with memory.accounting(account, attention) if account else contextlib.nullcontext():
                out.append((name, fn()))
            print(f"{name}: ok", flush=True)
        except Exception as error:  # one failing row must not lose the others
            FAILED.append(f"{name}: {type(error).__name__}: {error}")
            if os.environ.get("MEASURE_MEMORY_TRACEBACK"):
                traceback.print_exc()
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def trainer_steps(model, data, batch, cond=None, latents=False, precision="fp32", **changes):
        config = TrainConfig(steps=2, batch_size=batch, warmup=1, latents=latents, precision=precision, **changes)
        return lambda: Trainer(copy.deepcopy(model), data, config, device=device, conditioning=cond).train(progress=False)

    def row04(precision):
        f = full["04"]
        return memory.measure_peak(trainer_steps(UNet(get_preset(f["preset"])), emoji.images, f["batch"],
                                                 precision=precision), device,
                                   f"Trainer, {f['preset']}, batch {f['batch']}, 32 px", precision)

    def row05(precision):
        f = full["05"]
        model, schedule, _ = load_model(shipped("ddpm_emoji32"), device=device)
        return memory.sampling_memory(model, (f["batch"], 3, 32, 32), f["steps"], schedule=schedule,
                                      precision=precision)

    def row06():
        from course_lib.vae import VAE, fit_vae
        from course_lib.vae import vae_preset
        f = full["06"]
        return memory.measure_peak(
            lambda: fit_vae(VAE(vae_preset(f["vae_preset"])), emoji.images, steps=2, batch_size=f["batch"],
                            device=device, precision="bf16" if bf16 else "fp32", progress=False),
            device, f"fit_vae, {f['vae_preset']}, batch {f['batch']}")

    def row07(precision):
        f = full["07"]
        model = UNet(get_preset(f["latent_preset"], image_size=8, in_channels=4, out_channels=4))
        return memory.measure_peak(trainer_steps(model, latent_like, f["batch"], latents=True, precision=precision),
                                   device, f"Trainer, {f['latent_preset']} on 8x8x4 latents, batch {f['batch']}",
                                   precision)

    def tokenizer():
        from course_lib.tokenizer import Tokenizer
        return Tokenizer.train(emoji.captions, vocab_size=512)

    def row08():
        from course_lib.clip import MiniCLIP, clip_config, fit_clip
        f = full["08"]
        tok = tokenizer()
        return memory.measure_peak(
            lambda: fit_clip(MiniCLIP(clip_config(f["clip_preset"], tok.vocab_size)), tok, emoji.images,
                             emoji.captions, steps=2, batch_size=f["batch"], device=device,
                             precision="bf16" if bf16 else "fp32", progress=False),
            device, f"fit_clip, {f['clip_preset']}, batch {f['batch']}")

    def conditional_unet():
        from course_lib.clip import clip_config
        tok = tokenizer()
        width = clip_config("small", tok.vocab_size).text.width
        return UNet(get_preset(full["09"]["unet_preset"], context_dim=width)), tok.max_length, width

    def random_text(L, width):
        """Text states of the CLIP's shape for every training emoji (memory does not depend on their values)."""
        n = emoji.images.shape[0]
        return Conditioning(torch.randn(n, L, width), torch.ones(n, L, dtype=torch.bool), torch.zeros(L, width),
                            torch.ones(L, dtype=torch.bool))

    def row09_train(precision):
        f = full["09"]
        unet, L, width = conditional_unet()
        cond = random_text(L, width)
        return memory.measure_peak(trainer_steps(unet, latent_like, f["batch"], cond, latents=True,
                                                 precision=precision), device,
                                   f"Trainer, {f['unet_preset']} + text, batch {f['batch']}", precision)

    def row09_sample(precision):
        f = full["09"]
        unet, L, width = conditional_unet()
        B = f["sample_batch"]
        context = (torch.randn(B, L, width, device=device), torch.ones(B, L, dtype=torch.bool, device=device))
        return memory.sampling_memory(unet.to(device), (B, 4, 8, 8), f["sample_steps"], context=context,
                                      guidance_scale=f["guidance"], precision=precision)

    cache = {}

    def pipe():
        from course_lib.pipeline import TextToImage
        if "pipe" not in cache:
            cache["pipe"] = TextToImage.from_shipped(device=device)
        return cache["pipe"]

    def as_run(fn, what):
        return lambda: memory.measure_peak(fn, device, what, "fp32")

    # 10: LoRA against full fine-tuning of the tiny SD, on the twemoji captions (section 4's runs, section 7's steps)
    tw = load_emoji(size=32, split="train", style="twemoji", limit=8 if tiny else None)

    def row10_step(rank):
        def measure(precision):
            p, f = pipe(), full["10"]
            c, m = p.encode(tw.captions[:f["batch"]])
            unet = copy.deepcopy(p.unet)
            if rank:
                lora.inject_lora(unet, rank=rank)
            else:
                unet.requires_grad_(True)
            return memory.training_step_memory(unet, (f["batch"], *p.latent_shape), context=(c, m), precision=precision)
        return measure

    def row10_fine_tune():
        p, f = copy.copy(pipe()), full["10"]
        p.unet = copy.deepcopy(p.unet)
        lora.inject_lora(p.unet, rank=f["rank"])
        fine_tune(p, tw.images, tw.captions, lora.lora_parameters(p.unet), steps=2, batch_size=f["batch"])   # the row's
        # label keeps the name the function had when the H100 record was measured (results/memory_full_mode_h100.json)

    def row10_generate():
        f = full["10"]
        pipe().generate(tw.captions[:f["sample_batch"]], batch_size=f["sample_batch"], steps=f["sample_steps"],
                        guidance_scale=f["guidance"])

    # 11: DreamBooth of one subject from three images, with 48 class images (prior preservation)
    def subject():
        if "subject" not in cache:
            cache["subject"] = db.emoji_subjects("heldout")[0]
        return cache["subject"]

    def row11(method):
        def run():
            s, f = subject(), full["11"]
            tones = db.TONES[:3]
            db.dreambooth(pipe(), s.images[:3], [s.prompt(t) for t in tones], [s.prompt(t, None) for t in tones],
                          db.DreamBoothConfig(method=method, steps=2, batch_size=f["batch"],
                                              prior_images=f["prior_images"], prior_steps=f["prior_steps"]))
        return run

    def row11_step(rank):
        def measure(precision):
            p, f = pipe(), full["11"]
            c, m = p.encode(["person"] * f["step_batch"])
            unet = copy.deepcopy(p.unet)
            if rank:
                lora.inject_lora(unet, rank=rank)
            else:
                unet.requires_grad_(True)
            return memory.training_step_memory(unet, (f["step_batch"], *p.latent_shape), context=(c, m),
                                               precision=precision)
        return measure

    # 12: HyperDreamBooth: LiDB, the hypernetwork's training, rank-relaxed fast fine-tuning, textual inversion
    def row12_lidb():
        s, f = subject(), full["12"]
        p = hd.personal_pipeline(pipe())
        lidb = hd.LiDB(p.unet, hd.LiDBConfig(), seed=0)
        hd.fit_lidb(p, lidb, hd.subject_data(p, [s], tones=("",)), steps=2, batch_size=f["lidb_batch"])

    def demo():
        if "demo" not in cache:          # section 3's demo: 16 training subjects in six tones, one probe pipeline
            p = hd.personal_pipeline(pipe())
            lidb = hd.LiDB(p.unet, hd.LiDBConfig(), seed=0)
            cache["demo"] = p, lidb, hd.subject_data(p, db.emoji_subjects("train")[:full["12"]["demo_subjects"]])
        return cache["demo"]

    def row12_demo_lidb():
        p, lidb, data = demo()
        cache["pre"] = hd.fit_lidb(p, lidb, data, steps=2, batch_size=full["12"]["demo_batch"]).weights

    def row12_hyper():
        p, lidb, data = demo()
        pre = cache.get("pre")
        if pre is None:                  # the LiDB row did not run: its starting weights (memory is the same)
            pre = lidb.init_weights(int(data.subject.max()) + 1)
        hyper = hd.HyperNetwork(hd.hyper_config_for(lidb, image=pipe().clip.config.image)).to(device)
        hd.train_hypernetwork(hyper, p, lidb, data, pre, steps=2, batch_size=full["12"]["hyper_batch"])

    def row12_fast():
        s, f = subject(), full["12"]
        hyper, lidb_cfg, lidb_seed, _ = hd.load_hypernetwork(shipped("hyperdreambooth"), device=device)
        q = hd.personal_pipeline(pipe())
        q_lidb = hd.LiDB(q.unet, lidb_cfg, seed=lidb_seed)
        one = s.images[:1]
        with torch.no_grad():
            w = hyper(one.to(device), q_lidb.init_weights(1)[0])
        hd.fast_finetune(q, q_lidb, w, one, [s.prompt("")], rank=f["fast_rank"], steps=2)

    def row12_ti():
        from course_lib.textual_inversion import textual_inversion
        s = subject()
        textual_inversion(pipe(), s.images[:1], [s.prompt("")], init_word=None, steps=2)

    # 13: rectified flow (logit-normal) on the emoji latents, then Euler sampling for FID
    def row13_train(precision):
        f = full["13"]
        model = UNet(get_preset(f["preset"], image_size=8, in_channels=4, out_channels=4))
        return memory.measure_peak(trainer_steps(model, latent_like, f["batch"], latents=True, precision=precision,
                                                 objective="flow", timestep_sampling="logit_normal"), device,
                                   f"Trainer, flow, {f['preset']} on 8x8x4 latents, batch {f['batch']}", precision)

    def row13_sample():
        f = full["13"]
        model = UNet(get_preset(f["preset"], image_size=8, in_channels=4, out_channels=4))
        config = TrainConfig(steps=1, batch_size=2, latents=True, objective="flow", timestep_sampling="logit_normal")
        trainer = Trainer(model, latent_like, config, device=device)
        trainer.sample(f["sample_batch"], steps=f["sample_steps"], seed=1, sampler="euler")

    # 14: the tiny MMDiT (rectified flow, logit-normal) on the latents with text, as section 4 trains it
    def row14(precision):
        from course_lib.mmdit import MMDiT, mmdit_preset
        f = full["14"]
        _, L, width = conditional_unet()
        model = MMDiT(mmdit_preset(f["preset"], context_dim=width))
        return memory.measure_peak(trainer_steps(model, latent_like, f["batch"], random_text(L, width), latents=True,
                                                 precision=precision, objective="flow",
                                                 timestep_sampling="logit_normal"), device,
                                   f"Trainer, {f['preset']} + text, flow, batch {f['batch']}", precision)

    # 16: LCM-LoRA distillation from the shipped tiny SD; 17: a ControlNet on edges, both as the notebooks run them
    def row16():
        from course_lib.lcm import LCMConfig, distill_lcm_lora
        p = copy.copy(pipe())
        p.unet = copy.deepcopy(p.unet)
        distill_lcm_lora(p, emoji.images, list(emoji.captions), rank=full["16"]["rank"], steps=2,
                         batch_size=full["16"]["batch"], config=LCMConfig(target_ema=None))

    def row17():
        from course_lib import controls
        from course_lib.controlnet import fit_controlnet
        f = full["17"]
        fit_controlnet(pipe(), emoji.images, list(emoji.captions), controls.make_control(emoji.images, f["control"]),
                       steps=2, batch_size=f["batch"])

    # 15: editing 128 held-out emoji with the shipped tiny SD
    def heldout():
        if "heldout" not in cache:
            data = load_emoji(size=32, split="heldout", limit=full["15"]["n"])
            cache["heldout"] = (data.images, list(data.captions))
        return cache["heldout"]

    def row15(kind):
        def run():
            from course_lib import editing
            images, captions = heldout()
            f = full["15"]
            if kind == "img2img":
                editing.img2img(pipe(), images, captions, strength=f["strength"], steps=f["steps"])
            elif kind == "inpaint":
                mask = torch.zeros(1, 1, 32, 32)
                mask[..., 8:24, 8:24] = 1
                editing.inpaint(pipe(), images, mask, captions, steps=f["steps"], resample=f["resample"])
            else:
                editing.edit_with_inversion(pipe(), images, captions, captions, steps=f["steps"])
        return run

    from course_lib import dreambooth as db
    from course_lib import hyperdreambooth as hd
    from course_lib import lora
    from course_lib.finetune import fine_tune

    each = precisions(device, account)
    for name, fn in [("04 training step (pixel U-Net)", row04), ("05 sampling (shipped DDPM)", row05)]:
        for p in each:
            attempt(f"{name}, {p}", lambda: fn(p))
    attempt("06 VAE training step", row06)
    for p in each:
        attempt(f"07 latent training step, {p}", lambda: row07(p))
    attempt("08 mini-CLIP training step", row08)
    for name, fn in [("09 text-to-image training step", row09_train), ("09 sampling with guidance", row09_sample),
                     ("10 full fine-tuning step", row10_step(0)),
                     (f"10 LoRA step, rank {full['10']['rank']}", row10_step(full["10"]["rank"])),
                     ("11 full DreamBooth step (subject + class)", row11_step(0)),
                     ("11 LoRA DreamBooth step (subject + class)", row11_step(4)),
                     ("13 rectified-flow training step", row13_train),
                     ("14 MMDiT training step (tiny SD 3)", row14)]:
        for p in each:
            attempt(f"{name}, {p}", lambda: fn(p))
    f10, f11, f12, f13, f15 = (full[k] for k in ("10", "11", "12", "13", "15"))
    for name, fn in [
            (f"10 lora.fine_tune, rank {f10['rank']}, batch {f10['batch']} (as run)", row10_fine_tune),
            (f"10 generation, batch {f10['sample_batch']}, {f10['sample_steps']} steps, guided", row10_generate),
            (f"11 DreamBooth full, {f11['prior_images']} class images (as run)", row11("full")),
            (f"11 DreamBooth LoRA, {f11['prior_images']} class images (as run)", row11("lora")),
            (f"12 LiDB fit, batch {f12['lidb_batch']} (as run)", row12_lidb),
            (f"12 LiDB fit, {f12['demo_subjects']} subjects, batch {f12['demo_batch']} (as run)", row12_demo_lidb),
            (f"12 hypernetwork training, batch {f12['hyper_batch']} (as run)", row12_hyper),
            (f"12 hypernetwork + fast fine-tuning, rank {f12['fast_rank']} (as run)", row12_fast),
            ("12 textual inversion (as run)", row12_ti),
            (f"13 Euler sampling, batch {f13['sample_batch']}, {f13['sample_steps']} steps", row13_sample),
            (f"15 img2img, {f15['n']} images, {f15['steps']} steps", row15("img2img")),
            (f"15 inpainting, RePaint U = {f15['resample']}, {f15['n']} images", row15("inpaint")),
            (f"15 DDIM inversion and edit, {f15['n']} images", row15("invert")),
            (f"16 LCM-LoRA distillation, rank {full['16']['rank']}, batch {full['16']['batch']} (as run)", row16),
            (f"17 ControlNet training, {full['17']['control']}, batch {full['17']['batch']} (as run)", row17)]:
        attempt(name, as_run(fn, name))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="every batch and step count at most 2: the code path")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 10,12 (default all)")
    parser.add_argument("--account", default=None, choices=sorted(memory.GPUS),
                        help="no GPU needed: account every row at full size on fake tensors for this GPU")
    parser.add_argument("--attention", default=None, choices=sorted(memory.ATTENTION),
                        help="with --account: the attention kernel to model (default: the GPU's)")
    args = parser.parse_args(argv)
    if args.account:
        args.device = "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{memory.NOT_MEASURED}. To run every row's code path on a CPU: --device cpu --tiny", file=sys.stderr)
        return 2
    if device.type == "cpu" and not (args.tiny or args.account):
        parser.error("on a CPU nothing is measured and the full sizes are slow: use --device cpu --tiny")
    only = None if args.only is None else [x.strip().zfill(2) for x in args.only.split(",")]
    results = rows(device, tiny=args.tiny, only=only, account=args.account, attention=args.attention)
    sizes = "at most batch 2 and 2 steps (--tiny)" if args.tiny else "full-mode settings"
    how = (f"accounted as on the {args.account} with fake tensors on {describe_machine()}" if args.account
           else f"on {describe_machine()}")
    print(f"Peak GPU memory, {sizes}, {how} (torch {torch.__version__}); budget {memory.BUDGET_GIB:g} GiB")
    print(f"| {'what':56s} | {'details':52s} | peak GiB | reserved GiB | fits |")
    print(f"|{'-' * 58}|{'-' * 54}|----------|--------------|------|")
    cell = lambda v, f: "n/a" if v is None else format(v, f)
    for name, r in results:
        reserved = None if r.reserved_bytes is None else r.reserved_bytes / 2 ** 30
        fits = "n/a" if r.fits is None else "yes" if r.fits else "NO"
        print(f"| {name[:56]:56s} | {r.what[:52]:52s} | {cell(r.peak_gib, '8.3f'):>8s} | "
              f"{cell(reserved, '12.3f'):>12s} | {fits:4s} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": describe_machine(), "torch": torch.__version__, "device": str(device), "tiny": args.tiny,
            "rows": [{"name": n, "what": r.what, "peak_gib": r.peak_gib,
                      "reserved_gib": None if r.reserved_bytes is None else r.reserved_bytes / 2 ** 30,
                      "fits": r.fits, "precision": r.precision, "categories": r.categories} for n, r in results],
            "accounted": args.account,
            "failed": FAILED}, indent=1))
    if FAILED:
        print(f"{len(FAILED)} row(s) failed:\n" + "\n".join(FAILED), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
