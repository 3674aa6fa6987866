r"""Peak GPU memory of SD 1.5 at 512 x 512: generation and the fine-tuning steps of notebooks 10-12 and 18, against 8 GiB.

    python scripts/measure_sd15_memory.py                     # needs a CUDA GPU; prints a table
    python scripts/measure_sd15_memory.py --json sd15.json    # and writes the rows and the machine
    python scripts/measure_sd15_memory.py --preset tiny --device cpu --steps 2   # the same code path, in seconds

What is measured. The full-size SD 1.5 networks (860M U-Net, 84M VAE, 123M text encoder) are built once in
float16 on the GPU; then each row runs one job under course_lib.memory.measure_peak, which resets the peak
statistics first, so every row is "the resident weights + that job":

    weights only                the three networks in float16 (the floor under every other row)
    generation                  one prompt at --size, --steps DDIM steps, guidance 7.5 (the U-Net sees a batch
                                of 2 each step: the prompt and the empty prompt), the VAE decoding with slicing
    decode 2, sliced / at once  the VAE decoder on 2 latents, one at a time and both at once: what slicing saves
    LoRA step, checkpointing    course_lib.sd.LoRAFineTune, as fine_tune_lora runs it: the image encoded by the
                                VAE and the prompt by the text encoder (no gradients), add_lora(rank=4), then two
                                steps of the course's one loop (lora_loss, backward with the GradScaler, AdamW over
                                the adapters), so AdamW's two moment buffers exist on the second step
    LoRA step, no checkpointing the same with gradient checkpointing off: what checkpointing saves
    LoRA-DreamBooth step        the LoRA step on a batch of two, the subject image and a class image, which is
                                what DreamBooth's prior preservation trains on each step
    HyperDreamBooth fast FT     HyperDreamBooth's rank-relaxed fast fine-tuning as course_lib.hyperdreambooth runs
                                it on the tiny SD: LiDB layers on SD 1.5's attention projections, a predicted update
                                relaxed to rank-4 LoRA (LiDB.to_lora), then two LoRA steps on the one subject image.
                                The hypernetwork's own forward pass is not in this row (the course has no SD-sized
                                hypernetwork); LiDB's starting weights stand in for its prediction
    textual inversion step      every weight frozen; one row of the text encoder's token table trains (float32),
                                its gradient reaching it from the U-Net's denoising loss back through the frozen
                                float16 text encoder: two steps of the course's one loop (checkpointed U-Net,
                                GradScaler, AdamW over the 768 numbers).
                                The row is an existing token's (the subject word's first); a new row, as
                                course_lib.textual_inversion adds on the tiny SD, costs the same memory

`peak` is torch.cuda.max_memory_allocated, `reserved` the caching allocator's high-water mark (closer to what
nvidia-smi shows); "within 8 GiB" compares the larger, `reserved`. Neither counts the CUDA context (~0.3-0.5 GiB
per process). A row that runs out of GPU memory is reported as such; the others still run.

Why random weights suffice. The memory a network needs depends on the shapes of its weights and activations,
never on their values: StableDiffusion.random("sd15") allocates exactly the tensors the published checkpoint
fills. No download is needed. The byte-level tiny tokenizer reads the prompt (ids < 514, inside CLIP's 49,408);
the text encoder runs over all 77 positions whatever the tokenizer, so its cost is the same.

What keeps SD 1.5 under 8 GiB (see course_lib.sd):
    float16 weights                  2 bytes a parameter: 2.1 GB for all three networks instead of 4.3
    scaled_dot_product_attention     flash / memory-efficient kernels never store the 4,096 x 4,096 scores
    VAE slicing                      decode one image at a time: the decoder's 512 x 512 maps are the largest
                                     activations of generation
    gradient checkpointing           each U-Net Block's activations are recomputed in backward, not stored
    LoRA                             the 860M base is frozen: gradients and AdamW moments exist only for the
                                     adapters (~0.8M parameters at rank 4), kept in float32

On a machine without CUDA the script stops with a message, unless asked for `--preset tiny --device cpu`: that
runs every row on the tiny preset in seconds (the tests do this), with memory "n/a" since course_lib.memory
measures GPU memory only. Put the numbers in the README with the GPU's name and torch's version, as printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from course_lib import memory  # noqa: E402
from course_lib.checks import has_values  # noqa: E402
from course_lib.lidb import LiDB, LiDBConfig  # noqa: E402
from course_lib.finetune import FineTune  # noqa: E402
from course_lib.loop import FitConfig  # noqa: E402
from course_lib.lora import lora_layers, remove_lora  # noqa: E402
from course_lib.quantize import AdamW8bit, nf4_linears  # noqa: E402
from course_lib.sd import PRESETS, LoRAFineTune, StableDiffusion, sd_preset  # noqa: E402
from course_lib.settings import describe_machine  # noqa: E402

DEFAULT_SIZE = {"sd15": 512, "tiny": 64}        # SD 1.5's native resolution; the tiny VAE's
PROMPT = "a watercolour painting of a fox in the snow"
PLACEHOLDER = "sks"                              # the subject's word (DreamBooth's identifier, TI's placeholder)
SUBJECT_PROMPT, CLASS_PROMPT = f"a photo of {PLACEHOLDER} dog", "a photo of a dog"   # DreamBooth's two prompts
GUIDANCE = 7.5
LORA_RANK = 4
FAST_RANK = 4                                    # HyperDreamBooth's relaxed rank, as notebook 12 uses it
LORA_STEPS = 2                                   # the second step has AdamW's moments to hold


@dataclass
class Row:
    """One measured job: its course_lib.memory report, wall-clock seconds, and how it ended."""
    name: str
    report: memory.MemoryReport | None
    seconds: float
    status: str = "ok"                           # "ok", "out of memory" or "failed: <error>"

    def cells(self) -> tuple[str, str, str]:
        """(peak GiB, reserved GiB, within budget) as the table prints them."""
        r = self.report
        if self.status != "ok":
            return "-", "-", "OOM" if self.status == "out of memory" else "-"
        if not r.measured:
            return "n/a", "n/a", "n/a"
        reserved = "n/a" if r.reserved_bytes is None else f"{r.reserved_bytes / memory.GIB:.3f}"
        return f"{r.peak_gib:.3f}", reserved, "yes" if r.fits else "NO"

    def to_json(self) -> dict:
        r = self.report
        measured = r is not None and r.measured
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 3),
                "peak_gib": r.peak_gib if measured else None,
                "reserved_gib": r.reserved_bytes / memory.GIB if measured and r.reserved_bytes is not None else None,
                "fits": r.fits if measured else None,
                "categories_gib": ({k: v / memory.GIB for k, v in r.categories.items()}
                                   if measured and r.accounted else None)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15", choices=list(PRESETS), help="network sizes (default sd15)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --preset tiny)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the generation row (default 50)")
    parser.add_argument("--size", type=int, default=None, help="image height and width in pixels "
                        f"(default {DEFAULT_SIZE['sd15']} for sd15, {DEFAULT_SIZE['tiny']} for tiny)")
    parser.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    parser.add_argument("--only", default=None, type=lambda text: [part.strip() for part in text.split(",")],
                        help="comma-separated parts of row names: run those rows only (e.g. 'weights,LoRA step')")
    parser.add_argument("--account", default=None, choices=sorted(memory.GPUS),
                        help="no GPU needed: account every row on fake tensors for this GPU (course_lib.memory)")
    parser.add_argument("--attention", default=None, choices=sorted(memory.ATTENTION),
                        help="with --account: the attention kernel to model (default: the GPU's)")
    args = parser.parse_args(argv)
    if args.account:
        args.device = "cpu"

    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cuda, cuda:N or cpu; got {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("this script measures GPU memory and needs a CUDA GPU, which this machine lacks. "
                     "To exercise the code path on a CPU instead (nothing is measured), run it with "
                     "--preset tiny --device cpu")
    if args.device.type == "cpu" and args.preset != "tiny" and not args.account:
        parser.error(f"on a CPU, only --preset tiny runs (in seconds); --preset {args.preset} measures nothing "
                     "there and is slow. Use --preset tiny --device cpu, or a CUDA GPU")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu; got {args.device}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1; got {args.steps}")

    cfg = sd_preset(args.preset)
    multiple = cfg.vae.factor * 2 ** (cfg.unet.levels - 1)     # the VAE's factor times the U-Net's downsampling
    args.size = DEFAULT_SIZE[args.preset] if args.size is None else args.size
    if args.size < multiple or args.size % multiple:
        parser.error(f"--size must be a positive multiple of {multiple} for --preset {args.preset}; got {args.size}")
    return args


def measure_rows(sd: StableDiffusion, steps: int, size: int, only: list[str] | None = None) -> list[Row]:
    """Every job (or those whose names contain one of `only`), each measured on its own with the weights
    already resident."""
    device = sd.device
    rows: list[Row] = []

    def attempt(name: str, fn) -> None:
        if only and not any(part in name for part in only):
            return
        start = time.perf_counter()
        try:
            report = memory.measure_peak(fn, device, name, resident=(sd.unet, sd.vae, sd.text_encoder))
            rows.append(Row(name, report, time.perf_counter() - start))
        except torch.cuda.OutOfMemoryError:
            rows.append(Row(name, None, time.perf_counter() - start, "out of memory"))
        except Exception as error:  # one failing row must not lose the others
            rows.append(Row(name, None, time.perf_counter() - start, f"failed: {type(error).__name__}: {error}"))
        for p in sd.unet.parameters():          # an interrupted backward can leave gradients behind
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {rows[-1].status}, {rows[-1].seconds:.1f} s", flush=True)

    latent = size // sd.factor
    channels = sd.unet.config.in_channels
    two_latents = torch.randn(2, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    two_images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    attempt("weights only", lambda: None)
    plural = "s" if steps > 1 else ""
    attempt(f"generation, {size} px, batch 1, {steps} step{plural}, guidance {GUIDANCE:g}, VAE slicing",
            lambda: sd(PROMPT, steps=steps, guidance_scale=GUIDANCE, height=size, width=size, vae_slicing=True))
    attempt(f"generation, {size} px, batch 1, {steps} step{plural}, guidance {GUIDANCE:g}, VAE slicing, attention one "
            f"(image, head) pair at a time, VAE tiles of {VAE_TILE}",
            lambda: sd(PROMPT, steps=steps, guidance_scale=GUIDANCE, height=size, width=size, vae_slicing=True,
                       attention_slice=1, vae_tile=VAE_TILE))
    attempt("VAE decode, batch 2, sliced (one at a time)", lambda: sd.decode(two_latents, slicing=True))
    attempt(f"VAE decode, batch 2, sliced, tiles of {VAE_TILE}",
            lambda: sd.decode(two_latents, slicing=True, tile=VAE_TILE))
    attempt("VAE decode, batch 2, at once (no slicing)", lambda: sd.decode(two_latents, slicing=False))

    sd.add_lora(rank=LORA_RANK, gradient_checkpointing=True)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def lora_steps(checkpointing: bool):
        def run() -> None:        # what fine_tune_lora runs: encode once, then LORA_STEPS steps of the one loop
            sd.unet.config = sd.unet.config.replace(gradient_checkpointing=checkpointing)
            LoRAFineTune(sd, image, [PROMPT], steps=LORA_STEPS, rank=LORA_RANK,
                         gradient_checkpointing=checkpointing).run(progress=False)
        return run

    for checkpointing in (True, False):
        attempt(f"LoRA step, {size} px, batch 1, rank {LORA_RANK}, "
                f"{'gradient checkpointing' if checkpointing else 'no checkpointing'}", lora_steps(checkpointing))

    def dreambooth_steps() -> None:
        # DreamBooth's prior preservation trains on the subject image and a class image in one batch (the loss is
        # the subject term plus lambda times the class term): a LoRA step on a batch of two, as memory goes.
        sd.unet.config = sd.unet.config.replace(gradient_checkpointing=True)
        LoRAFineTune(sd, two_images, [SUBJECT_PROMPT, CLASS_PROMPT], steps=LORA_STEPS, rank=LORA_RANK,
                     batch_size=2, gradient_checkpointing=True).run(progress=False)

    attempt(f"LoRA-DreamBooth step with prior preservation, {size} px, batch 2 (subject + class image), "
            f"rank {LORA_RANK}, gradient checkpointing", dreambooth_steps)

    def hyperdreambooth_fast_steps() -> None:
        # course_lib.hyperdreambooth.fast_finetune's steps on SD: LiDB on the attention projections, the predicted
        # rank-1 update relaxed to rank FAST_RANK (memory does not depend on the values: LiDB's starting weights
        # stand in for the hypernetwork's prediction), then LoRA steps on the one subject image
        remove_lora(sd.unet)
        lidb = LiDB(sd.unet, LiDBConfig(), seed=0)
        lidb.to_lora(lidb.init_weights(1), rank=FAST_RANK)
        LoRAFineTune(sd, image, [SUBJECT_PROMPT], steps=LORA_STEPS, rank=FAST_RANK,
                     gradient_checkpointing=True).run(progress=False)

    attempt(f"HyperDreamBooth rank-relaxed fast fine-tuning, {size} px, batch 1, LiDB -> rank {FAST_RANK}, "
            f"gradient checkpointing", hyperdreambooth_fast_steps)

    def textual_inversion_steps() -> None:
        remove_lora(sd.unet)
        sd.unet.requires_grad_(False)
        sd.text_encoder.requires_grad_(False)
        sd.unet.config = sd.unet.config.replace(gradient_checkpointing=True)
        ids, _ = sd.tokenizer([SUBJECT_PROMPT])
        ids = ids.to(device)
        table = sd.text_encoder.token_embedding
        word = SUBJECT_PROMPT.split().index(PLACEHOLDER)                      # "a photo of sks dog": the 4th word
        token = int(ids[0, 1 + len(sd.tokenizer.encode(" ".join(SUBJECT_PROMPT.split()[:word])))])
        one_row = OneTrainedRow(table, token)
        sd.text_encoder.token_embedding = one_row
        start = one_row.row.detach().clone()
        try:
            OneRowFineTune(sd, image, ids, one_row).run(progress=False)
            if has_values(start) and (torch.equal(one_row.row.detach(), start)
                                      or not torch.isfinite(one_row.row).all()):
                raise RuntimeError("textual inversion: the trained row did not move (no gradient reached it) "
                                   "or is not finite")
        finally:
            sd.text_encoder.token_embedding = table

    attempt(f"textual inversion step, {size} px, batch 1, one embedding row trained through the frozen text "
            f"encoder, gradient checkpointing", textual_inversion_steps)

    # Full DreamBooth: every U-Net weight trains, on the subject and a class image a step (prior preservation).
    # The U-Net is converted to the row's weight dtype before the measurement, as a run would load it.
    if lora_layers(sd.unet):
        remove_lora(sd.unet)
    resident = sd.unet.conv_in.weight.dtype
    for dtype, optimizer, checkpointing in FULL_DREAMBOOTH:
        sd.unet.to(dtype).requires_grad_(True)
        sd.unet.config = sd.unet.config.replace(gradient_checkpointing=checkpointing)
        attempt(f"full DreamBooth, {DTYPE_NAMES[dtype]}, {optimizer}{', checkpointing' if checkpointing else ''}; "
                f"{size} px, batch 2 (subject + class)",
                lambda: FullFineTune(sd, two_images, [SUBJECT_PROMPT, CLASS_PROMPT], optimizer).run(progress=False))
        sd.unet.requires_grad_(False).to(resident)

    # QLoRA: the frozen U-Net's linear layers in NF4 (course_lib.quantize.nf4_linears, dequantised to float16 when
    # used), LoRA on top. Converted before the measurement, as a run would load it; the last row, since it is lasting.
    name = f"QLoRA step, {size} px, batch 1, rank {LORA_RANK}, NF4 base (linear layers), gradient checkpointing"
    if not only or any(part in name for part in only):
        nf4_linears(sd.unet, dtype=sd.unet.conv_in.weight.dtype)
        attempt(name, lora_steps(True))
    return rows


VAE_TILE = 32      # latent pixels a side of a tile (256 px at SD 1.5's factor 8)
DTYPE_NAMES = {torch.float32: "float32 weights + fp16 autocast", torch.bfloat16: "bf16 weights (stochastic rounding)"}
# (weights, optimiser, gradient checkpointing): the plain recipe, then each saving added in turn
FULL_DREAMBOOTH = [(torch.float32, "AdamW", False), (torch.float32, "AdamW", True),
                   (torch.float32, "8-bit AdamW", True), (torch.bfloat16, "8-bit AdamW", True),
                   (torch.bfloat16, "8-bit AdamW", False)]


class FullFineTune(FineTune):
    """Every U-Net weight trained with SD's denoising loss (sd.lora_loss, whatever the trained weights), as the
    course's one loop runs it: float32 weights under fp16 autocast with the GradScaler on a GPU, or bfloat16
    weights in pure bf16, whose 8-bit AdamW writes updates back with stochastic rounding (course_lib.quantize)."""

    def __init__(self, sd: StableDiffusion, images: torch.Tensor, captions: list[str], optimizer: str):
        self.sd = sd
        self.latents = sd.encode_images(images)
        self.context = sd.encode(captions).float()
        params = list(sd.unet.parameters())
        opt = (AdamW8bit(params, lr=5e-6, weight_decay=0.0) if optimizer == "8-bit AdamW"
               else torch.optim.AdamW(params, lr=5e-6, weight_decay=0.0))
        fp16 = sd.device.type == "cuda" and sd.unet.conv_in.weight.dtype == torch.float32
        super().__init__(FitConfig(steps=LORA_STEPS, lr=5e-6, grad_clip=None, precision="fp16" if fp16 else "fp32"),
                         opt, sd.device, module=sd.unet)

    def loss(self) -> torch.Tensor:
        return self.sd.lora_loss(self.latents.to(self.device), self.context, self.generator)


class OneRowFineTune(FineTune):
    """Textual inversion's step on SD as the course's one loop runs it: one token's embedding row (float32) trained
    through the frozen text encoder with SD's denoising loss (sd.lora_loss), AdamW, no clipping, the GradScaler
    with a float16 model on a GPU; the image encoded once."""

    def __init__(self, sd: StableDiffusion, image: torch.Tensor, ids: torch.Tensor, one_row: "OneTrainedRow"):
        self.sd, self.ids = sd, ids
        self.latents = sd.encode_images(image)
        fp16 = sd.device.type == "cuda" and sd.dtype == torch.float16
        super().__init__(FitConfig(steps=LORA_STEPS, lr=5e-3, grad_clip=None, precision="fp16" if fp16 else "fp32"),
                         torch.optim.AdamW([one_row.row], lr=5e-3, weight_decay=0.0), sd.device)

    def loss(self) -> torch.Tensor:
        context = self.sd.text_encoder(self.ids, None)                  # with gradients, to the one row
        return self.sd.lora_loss(self.latents, context.float(), self.generator)


class OneTrainedRow(torch.nn.Module):
    """A frozen token table in which the row of one token trains (float32): nn.Embedding's forward(ids)."""

    def __init__(self, table: torch.nn.Embedding, token: int):
        super().__init__()
        self.table, self.token = table, token
        self.row = torch.nn.Parameter(table.weight.detach()[token].float().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.table(ids)
        return torch.where((ids == self.token)[..., None], self.row.to(x.dtype), x)


def print_table(rows: list[Row], header: str) -> None:
    budget = f"within {memory.BUDGET_GIB:g} GiB"
    print(header)
    print(f"| {'row':100s} | peak GiB | reserved GiB | {budget} | seconds |")
    print(f"|{'-' * 102}|----------|--------------|{'-' * (len(budget) + 2)}|---------|")
    for row in rows:
        peak, reserved, fits = row.cells()
        print(f"| {row.name[:100]:100s} | {peak:>8s} | {reserved:>12s} | {fits:^{len(budget)}s} | {row.seconds:7.1f} |")
    for row in rows:
        if row.status != "ok":
            print(f"{row.name}: {row.status}")


def millions(n: int) -> str:
    """A parameter count for people: 859.5M, 0.044M."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.3f}M"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.account:
        with memory.accounting(args.account, args.attention):
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    device = args.device
    # float16 on a GPU and when accounting for one; on a CPU float32 (float16 CPU kernels are slow or missing)
    dtype = torch.float16 if device.type == "cuda" or args.account else torch.float32
    start = time.perf_counter()
    sd = StableDiffusion.random(args.preset, seed=0, device=device, dtype=dtype)
    build_seconds = time.perf_counter() - start
    counts = sd.parameter_counts()
    print(f"Built {args.preset} with random weights in {build_seconds:.1f} s, {str(dtype).removeprefix('torch.')}: "
          + ", ".join(f"{name} {millions(n)}" for name, n in counts.items())
          + f", {millions(sum(counts.values()))} in all", flush=True)

    rows = measure_rows(sd, args.steps, args.size, args.only)

    if args.account:
        gpu, total_gib = None, None
        machine = (f"{describe_machine()}: accounted as on the {args.account} with fake tensors, "
                   f"{rows[0].report.device.split(', ', 1)[-1] if rows and rows[0].report else ''}")
    elif device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        total_gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
        machine = f"{gpu} ({total_gib:.0f} GiB)"
    else:
        gpu, total_gib, machine = None, None, f"{describe_machine()}: {memory.NOT_MEASURED}"
    print()
    print_table(rows, f"Peak memory of {args.preset} at {args.size} x {args.size}, {dtype}, on {machine}, "
                      f"torch {torch.__version__}; budget {memory.BUDGET_GIB:g} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": describe_machine(), "gpu": gpu, "gpu_total_gib": total_gib, "torch": torch.__version__,
            "device": str(device), "accounted": args.account, "dtype": str(dtype), "preset": args.preset,
            "size": args.size, "steps": args.steps,
            "guidance_scale": GUIDANCE, "lora_rank": LORA_RANK, "budget_gib": memory.BUDGET_GIB,
            "parameters": counts, "rows": [row.to_json() for row in rows]}, indent=1))
    failed = [row.name for row in rows if row.status.startswith("failed")]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
