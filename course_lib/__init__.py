"""course_lib: the finished pieces of "Stable Diffusion from scratch, in 8 GB".

One module per course concept, in the order the notebooks introduce them:
    settings    run modes (COURSE_QUICK) and the default device
    data        emoji and photos, loaded offline as tensors in [-1, 1]
    schedules   noise schedules (linear, scaled-linear, cosine, sigmoid) and their tables
    forward     the forward process: one Markov step, the closed form, the posterior
    unet        the U-Net: time embedding, ResBlock, self-attention, down/up sampling, presets
    learned_schedule  a noise schedule learned with the denoiser (Variational Diffusion Models)
    checkpoint  safetensors files written atomically; compact float16 model files
    train       the training loop: objectives, AdamW warm-up, EMA, mixed precision, exact resume
    sampling    DDPM, DDIM and DPM-Solver++ 2M samplers, the reverse process step by step, inversion
    vae         a small KL autoencoder: the latent space, the KL term, the latent scale factor
    text        a BPE tokenizer, a transformer text encoder (causal, as CLIP's, if asked) and a mini CLIP
    pipeline    the tiny Stable Diffusion: prompts in, images out
    lora        LoRA layers: inject, merge, scale, save; the fine-tuning loop of notebooks 10-12
    dreambooth  a new identifier token, the held-out subjects, the prior-preservation loss
    hyperdreambooth  LiDB, the hypernetwork, rank-relaxed fast fine-tuning
    clip_tokenizer   CLIP's byte-level BPE tokenizer, read from the learner's vocab and merges files
    sd          Stable Diffusion 1.5 in these modules: configs, weight conversion, generation, LoRA in 8 GB
    distributed data parallelism for the Trainer under torchrun
    metrics     FID/KID in the course's feature space, the real-vs-real floor, memorisation check
    memory      peak GPU memory of a training step and of sampling, measured
    plotting    image grids, noising strips, schedule curves, loss curves (matplotlib)
    widgets     the logic behind the notebooks' sliders (matplotlib; ipywidgets only in `live`)

Only plotting and widgets import matplotlib; only widgets imports ipywidgets.
"""

__version__ = "0.1.0"
