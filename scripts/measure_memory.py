"""Peak GPU memory of every full-mode training step and sampling run in notebooks 04-09, against 8 GiB.

    python scripts/measure_memory.py                   # needs a CUDA GPU; prints a table
    python scripts/measure_memory.py --json out.json   # and writes the rows

Each row runs the same course_lib call the notebook runs in full mode (the sizes below are the notebooks'
full-mode settings), twice (two optimiser steps, so AdamW's state exists), under
course_lib.memory.measure_peak. `peak` is torch.cuda.max_memory_allocated, `reserved` the caching
allocator's high-water mark (closer to nvidia-smi); neither counts the CUDA context (~0.3-0.5 GiB).
On a machine without CUDA it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
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
}


def rows(device: torch.device) -> list[tuple[str, memory.MemoryReport]]:
    from course_lib.checkpoint import load_model, shipped
    from course_lib.data import load_emoji
    from course_lib.train import Conditioning, TrainConfig, Trainer
    from course_lib.unet import UNet, get_preset

    out = []
    emoji = load_emoji(size=32, split="train")
    latent_like = torch.randn(emoji.images.shape[0], 4, 8, 8)
    bf16 = memory.resolve_precision("auto", device) == "bf16"   # fit_vae / fit_clip take fp32 or bf16

    def attempt(name, fn):
        try:
            out.append((name, fn()))
        except Exception as error:  # one failing row must not lose the others
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)

    def trainer_steps(model, data, batch, cond=None, latents=False):
        config = TrainConfig(steps=2, batch_size=batch, warmup=1, latents=latents)
        return lambda: Trainer(model, data, config, device=device, conditioning=cond).train(progress=False)

    def row04():
        f = FULL["04"]
        return memory.measure_peak(trainer_steps(UNet(get_preset(f["preset"])), emoji.images, f["batch"]), device,
                                   f"Trainer, {f['preset']}, batch {f['batch']}, 32 px")

    def row05():
        f = FULL["05"]
        model, schedule, _ = load_model(shipped("ddpm_emoji32"), device=device)
        return memory.sampling_memory(model, (f["batch"], 3, 32, 32), f["steps"], schedule=schedule)

    def row06():
        from course_lib.vae import VAE, fit_vae
        from course_lib.vae import vae_preset
        f = FULL["06"]
        return memory.measure_peak(
            lambda: fit_vae(VAE(vae_preset(f["vae_preset"])), emoji.images, steps=2, batch_size=f["batch"],
                            device=device, precision="bf16" if bf16 else "fp32", progress=False),
            device, f"fit_vae, {f['vae_preset']}, batch {f['batch']}")

    def row07():
        f = FULL["07"]
        model = UNet(get_preset(f["latent_preset"], image_size=8, in_channels=4, out_channels=4))
        return memory.measure_peak(trainer_steps(model, latent_like, f["batch"], latents=True), device,
                                   f"Trainer, {f['latent_preset']} on 8x8x4 latents, batch {f['batch']}")

    def tokenizer():
        from course_lib.tokenizer import Tokenizer
        return Tokenizer.train(emoji.captions, vocab_size=512)

    def row08():
        from course_lib.clip import MiniCLIP, clip_config, fit_clip
        f = FULL["08"]
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
        return UNet(get_preset(FULL["09"]["unet_preset"], context_dim=width)), tok.max_length, width

    def row09_train():
        f = FULL["09"]
        unet, L, width = conditional_unet()
        n = emoji.images.shape[0]
        cond = Conditioning(torch.randn(n, L, width), torch.ones(n, L, dtype=torch.bool), torch.zeros(L, width),
                            torch.ones(L, dtype=torch.bool))
        return memory.measure_peak(trainer_steps(unet, latent_like, f["batch"], cond, latents=True), device,
                                   f"Trainer, {f['unet_preset']} + text, batch {f['batch']}")

    def row09_sample():
        f = FULL["09"]
        unet, L, width = conditional_unet()
        B = f["sample_batch"]
        context = (torch.randn(B, L, width, device=device), torch.ones(B, L, dtype=torch.bool, device=device))
        return memory.sampling_memory(unet.to(device), (B, 4, 8, 8), f["sample_steps"], context=context,
                                      guidance_scale=f["guidance"])

    attempt("04 training step (pixel U-Net)", row04)
    attempt("05 sampling (shipped DDPM)", row05)
    attempt("06 VAE training step", row06)
    attempt("07 latent training step", row07)
    attempt("08 mini-CLIP training step", row08)
    attempt("09 text-to-image training step", row09_train)
    attempt("09 sampling with guidance", row09_sample)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(memory.NOT_MEASURED)
        return
    device = torch.device("cuda")
    results = rows(device)
    print(f"Peak GPU memory, full-mode settings, on {describe_machine()} (torch {torch.__version__}); "
          f"budget {memory.BUDGET_GIB:g} GiB")
    print(f"| {'what':36s} | {'details':52s} | peak GiB | reserved GiB | fits |")
    print(f"|{'-' * 38}|{'-' * 54}|----------|--------------|------|")
    for name, r in results:
        print(f"| {name:36s} | {r.what[:52]:52s} | {r.peak_gib:8.3f} | {r.reserved_bytes / 2 ** 30:12.3f} | {'yes' if r.fits else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "torch": torch.__version__,
                                               "rows": [{"name": n, "what": r.what, "peak_gib": r.peak_gib,
                                                         "reserved_gib": r.reserved_bytes / 2 ** 30, "fits": r.fits,
                                                         "precision": r.precision} for n, r in results]},
                                              indent=1))


if __name__ == "__main__":
    main()
