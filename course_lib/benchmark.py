"""Notebook 12's benchmark: six ways to personalise the tiny Stable Diffusion, measured side by side.

For each held-out subject (an emoji with six skin tones, course_lib.dreambooth.Subject) every method is given
one image, the default tone captioned "sks <class>", and asked for the five other tones:

    DreamBooth                        full fine-tuning with prior preservation [1]
    LoRA-DreamBooth                   rank-4 LoRA adapters [2] trained with the same loss
    LiDB                              HyperDreamBooth's lightweight DreamBooth: rank-1 in a frozen random basis [3]
    hypernetwork only                 one forward pass of the hypernetwork predicting the LiDB weights [3]
    hypernetwork + fast fine-tuning   that prediction, then rank-relaxed fast fine-tuning [3]
    textual inversion                 one new word's embedding row, every weight of the model frozen [4]

Each is scored on what it costs (seconds, numbers trained, the bytes of its file: what it adds to the base model
as float16 safetensors) and what it gives: subject fidelity (feature-space
similarity to the subject's real images, course_lib.metrics.subject_similarity) and prompt fidelity, by two
judges that condition nothing: the independent mini CLIP's score of the class prompt (checkpoints/clip_judge,
course_lib.clip.clip_score) and the skin-tone judge's tone accuracy (course_lib.judges, via
course_lib.judges.tone_accuracy). Two reference rows bracket the scores: the base model given the class
prompt, and the real images themselves.

This module sits above the methods it compares (it imports dreambooth, hyperdreambooth, lora and
textual_inversion), so that
course_lib.metrics only measures and imports none of them. scripts/bench_personalisation.py runs it over
more subjects for the README.

References:
  [1] Ruiz et al. 2023, DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation.
      https://arxiv.org/abs/2208.12242
  [2] Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models. https://arxiv.org/abs/2106.09685
  [3] Ruiz et al. 2024, HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models.
      https://arxiv.org/abs/2307.06949
  [4] Gal et al. 2022, An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion.
      https://arxiv.org/abs/2208.01618
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from . import dreambooth as db
from . import hyperdreambooth as hd
from . import judges
from .checkpoint import checksum, read, shipped
from .clip import clip_score, load_clip
from .lora import adapter_numbers, lora_state_dict
from .textual_inversion import textual_inversion
from .metrics import self_similarity, subject_similarity

__all__ = ["PERSONALISATION_METHODS", "compare_personalisation", "file_bytes", "paper_claim", "recorded_comparison", "summarise", "RECORD_PATH"]

RECORD_PATH = Path(__file__).resolve().parent.parent / "results" / "personalisation.json"   # the README's run

PERSONALISATION_METHODS = ("DreamBooth", "LoRA-DreamBooth", "LiDB", "hypernetwork only",
                           "hypernetwork + fast fine-tuning", "textual inversion")


def file_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The size in bytes of a safetensors file holding `tensors` in float16: what a method adds to the base
    model for one subject (its header included)."""
    return len(safetensors_bytes({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}))


def compare_personalisation(base, hyper, lidb_config, lidb_seed: int, subjects: list, *, db_steps: int = 400,
                            fast_steps: int = 40, fast_rank: int = 4, fast_lr: float = 1e-3, seeds: int = 4,
                            steps: int = 20, guidance_scale: float = 3.0, prior_images: int = 48,
                            ti_steps: int | None = None, ti_lr: float = 5e-3, report=print) -> tuple[dict, dict, dict]:
    """Notebook 12's comparison. For each subject (course_lib.dreambooth.Subject), every method gets the
    default-tone image captioned "sks <class>" and is asked for the five other tones, `seeds` images each:

      DreamBooth                        full fine-tuning with prior preservation, db_steps steps
      LoRA-DreamBooth                   rank-4 LoRA with prior preservation, db_steps steps
      LiDB                              the LiDB numbers alone, db_steps steps
      hypernetwork only                 one forward pass of `hyper`
      hypernetwork + fast fine-tuning   rank relaxation to rank fast_rank, fast_steps steps
      textual inversion                 the new word's embedding row alone, from the class noun's, ti_steps
                                        steps (default db_steps) at learning rate ti_lr

    Returns (records: method -> one dict per subject with seconds, bytes (`file_bytes` of what the method adds:
    the fine-tuned U-Net, the adapters, the LiDB numbers, the hypernetwork's predicted LiDB numbers, the embedding
    row), subject (fidelity), prompt (the independent CLIP judge's score), tone (the tone judge's accuracy); plus
    the rows "base model, class prompt" and "real images" without bytes; numbers: method -> numbers trained;
    examples: subject name -> method -> the first seed's images of the five tones)."""
    asked = db.TONES[1:]
    judge, judge_tokenizer, _ = load_clip(shipped("clip_judge"), device=base.device)

    def scores(images, s, tones, real=False):
        class_prompts = [s.prompt(t, None) for t in tones]
        return dict(subject=self_similarity(images) if real else subject_similarity(images, s.images[1:]),
                    prompt=clip_score(judge, judge_tokenizer, images, class_prompts).mean().item(),
                    tone=judges.tone_accuracy(images, tones))

    tones = [t for t in asked for _ in range(seeds)]
    records = {m: [] for m in PERSONALISATION_METHODS + ("base model, class prompt", "real images")}
    counts = hd.lidb_numbers(base.unet, lidb_config)
    numbers = {"DreamBooth": counts["full"], "LoRA-DreamBooth": counts["lora_rank4"], "LiDB": counts["lidb"],
               "hypernetwork only": 0, "hypernetwork + fast fine-tuning": None, "textual inversion": None}
    examples: dict = {}
    for s in subjects:
        one, prompt, cls = s.images[:1], [s.prompt("")], [s.prompt("", None)]
        out = {}
        for name, method in (("DreamBooth", "full"), ("LoRA-DreamBooth", "lora")):
            r = db.dreambooth(base, one, prompt, cls, db.DreamBoothConfig(
                method=method, steps=db_steps, prior_images=prior_images, prior_steps=steps,
                guidance_scale=guidance_scale))
            stored = dict(r.pipe.unet.named_parameters()) if method == "full" else lora_state_dict(r.pipe.unet)
            out[name] = (r.seconds + r.prior_seconds, r.pipe, stored)
        p = hd.personal_pipeline(base)
        lidb = hd.LiDB(p.unet, lidb_config, seed=lidb_seed)
        fit = hd.fit_lidb(p, lidb, hd.subject_data(p, [s], tones=("",)), steps=db_steps, batch_size=4)
        lidb.set(fit.weights)
        out["LiDB"] = (fit.seconds, p, {"lidb": fit.weights})
        p = hd.personal_pipeline(base)
        lidb = hd.LiDB(p.unet, lidb_config, seed=lidb_seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            w = hyper(one.to(base.device), lidb.init_weights(1)[0])
        t_hyper = time.perf_counter() - t0
        lidb.set(w)
        out["hypernetwork only"] = (t_hyper, p, {"lidb": w})
        q = hd.personal_pipeline(base)
        q_lidb = hd.LiDB(q.unet, lidb_config, seed=lidb_seed)
        fast = hd.fast_finetune(q, q_lidb, w, one, prompt, rank=fast_rank, steps=fast_steps, lr=fast_lr)
        numbers["hypernetwork + fast fine-tuning"] = adapter_numbers(q.unet)
        out["hypernetwork + fast fine-tuning"] = (t_hyper + fast.seconds, q, lora_state_dict(q.unet))
        whole = len(base.tokenizer.tokens(s.class_noun)) == 1     # a class noun the tokenizer splits: a random row
        ti = textual_inversion(base, one, prompt, init_word=s.class_noun if whole else None,
                               steps=ti_steps or db_steps, lr=ti_lr)
        numbers["textual inversion"] = ti.trainable
        out["textual inversion"] = (ti.seconds, ti.pipe, {db.IDENTIFIER: ti.embedding})
        for name, (seconds, pipe, stored) in out.items():
            images = pipe([s.prompt(t) for t in tones], seed=1000, steps=steps, guidance_scale=guidance_scale)
            records[name].append(dict(seconds=seconds, bytes=file_bytes(stored), **scores(images, s, tones)))
            examples.setdefault(s.name, {})[name] = images[::seeds]
        base_images = base([s.prompt(t, None) for t in tones], seed=1000, steps=steps, guidance_scale=guidance_scale)
        records["base model, class prompt"].append(dict(seconds=0.0, **scores(base_images, s, tones)))
        records["real images"].append(dict(seconds=0.0, **scores(s.images[1:], s, list(asked), real=True)))
        report(f"{s.name}: done")
    return records, numbers, examples


def paper_claim(summary: dict) -> dict:
    """HyperDreamBooth's claim ([3]: DreamBooth's subject fidelity, many times faster) checked on a `summarise`d
    comparison: speedup (DreamBooth's seconds over hypernetwork + fast fine-tuning's), gap (their subject-fidelity
    difference), span (DreamBooth's gain over the base model's class images), share (gap's complement as a share of
    span: 1 = all of DreamBooth's gain) and matches (the gap is within a quarter of the span)."""
    dbm, hyp = summary["DreamBooth"], summary["hypernetwork + fast fine-tuning"]
    span = dbm["subject"] - summary["base model, class prompt"]["subject"]
    gap = hyp["subject"] - dbm["subject"]
    return dict(speedup=dbm["seconds"] / hyp["seconds"], gap=gap, span=span,
                share=(hyp["subject"] - summary["base model, class prompt"]["subject"]) / span if span else float("nan"),
                matches=gap >= -0.25 * abs(span))


def recorded_comparison(path: str | Path = RECORD_PATH) -> dict:
    """The README's larger comparison as scripts/bench_personalisation.py wrote it (command, machine, subjects,
    numbers, summary, records, table)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no recorded comparison at {path}; make it with "
                                f"`python scripts/bench_personalisation.py --subjects 12`")
    return json.loads(path.read_text())


def shipped_identity(names: tuple[str, ...] = ("tiny_sd_emoji", "vae_emoji32", "clip_emoji",
                                                "hyperdreambooth")) -> dict[str, str]:
    """The SHA-256 checksums of the shipped files a comparison runs on (by default the personalisation comparison's:
    the tiny SD's U-Net, VAE, mini CLIP and the hypernetwork): a record holding other checksums was made with other
    models."""
    return {name: checksum(*read(shipped(name))) for name in names}


def record_is_current(record: dict) -> bool | None:
    """Whether a recorded comparison was made with the shipped models (None: the record does not say)."""
    return None if "models" not in record else record["models"] == shipped_identity()


def summarise(records: dict) -> dict:
    """method -> the mean over subjects of each measure in `records` (from compare_personalisation)."""
    return {m: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for m, rows in records.items() if rows}
