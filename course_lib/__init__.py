"""course_lib: the finished pieces of "Stable Diffusion from scratch, in 8 GB".

One module per course concept, in the order the notebooks introduce them:
    settings    run modes (COURSE_QUICK), the default device, timing
    checks      checks every module shares (has_values: a fake tensor's values are not read)
    data        emoji and photos, loaded offline as tensors in [-1, 1]
    config      the JSON round trip every config dataclass shares
    schedules   noise schedules (linear, scaled-linear, cosine, sigmoid), zero terminal SNR, and rectified
                flow's straight path (with SD 3's timestep shift): the paths every sampler walks
    forward     the forward process (one Markov step, the closed form, the posterior) and the one objective
    attention   self-attention, cross-attention to text, SD's transformer block
    denoiser    what every denoising network shares: the call model(x_t, t, context, mask) and its checks
    unet        the U-Net: time embedding, ResBlock, down/up sampling, presets; its encoder half (UNetEncoder)
    dit         the diffusion transformer: patches, 2-D sin-cos positions, adaLN-Zero blocks
    mmdit       SD 3's MMDiT: text and image streams, one joint attention, QK-norm
    checkpoint  safetensors files written atomically and verified; knows no model
    unet_file   the denoiser's model file: float16 weights, architecture and config, schedule and prediction
    precision   mixed precision: which a device gets, the autocast that applies it
    loop        the one fitting loop: optimizer step, precision, guards, EMA, budget, checkpoints, resume
    learned_schedule  a noise schedule learned with the denoiser (Variational Diffusion Models)
    train       the diffusion Trainer: its data, objective settings and sampling grids, on the loop
    guidance    classifier-free guidance around any conditional U-Net
    consistency the consistency function (LCM's boundary coefficients) and its few-step sampler
    sampling    one sampling path for every objective: DDPM, DDIM, DPM-Solver++ 2M, Euler, Heun, LCM, inversion
    feature_net the frozen emoji classifier whose features FID, KID and memorisation use
    metrics     FID/KID and precision/recall in that feature space, the real-vs-real floor, memorisation,
                subject fidelity
    pixel_metrics  PSNR, sharpness and colour of image sets (re-exported by metrics)
    judges      classifiers trained on real emoji only that judge style (Noto or Twemoji) and skin tone
    vae         a small KL autoencoder: the latent space, the KL term, the latent scale factor
    vae_gan     the VAE trained with perceptual and adversarial terms, as Stable Diffusion's autoencoder
    tokenizer   the course's BPE tokenizer
    text        a transformer text encoder (causal, as CLIP's, if asked)
    clip        a mini CLIP: image and text encoders trained contrastively, retrieval, scores
    pipeline    the tiny Stable Diffusion, and the one generation path SD 1.5 shares
    finetune    what every fine-tuning method shares on top of the loop
    lora        LoRA layers: inject, merge, scale, save
    dreambooth  a new identifier token, the held-out subjects, the prior-preservation loss
    textual_inversion  a subject as one new word: only its embedding row trains
    lidb        Lightweight DreamBooth: rank-1 LoRA through frozen random bases
    hyperdreambooth  LiDB pre-optimisation, the hypernetwork, rank-relaxed fast fine-tuning
    lcm         latent consistency distillation (LCM, LCM-LoRA) of the tiny SD through the one loop
    reflow      reflow of a text-to-image flow: its own (noise, image) pairs, trained straight through the one loop
    controls    control images: Sobel edges, Canny, the emoji's silhouette, a coarse colour layout
    controlnet  ControlNet: a trainable copy of the U-Net's encoder through zero convolutions, steering the tiny SD
    benchmark   notebook 12's comparison of the personalisation methods
    clip_tokenizer   CLIP's byte-level BPE tokenizer, read from the learner's vocab and merges files
    sd_convert  SD 1.5's weight names to these modules, every key checked
    sd          Stable Diffusion 1.5 in these modules: configs, generation, LoRA in 8 GB
    flow        rectified flow (SD 3's objective): the straight path, its loss, logit-normal times, ODE solvers, reflow
    editing     img2img (SDEdit), inpainting (replace + RePaint resampling), DDIM-inversion edits with the tiny SD
    distributed data parallelism for the loop under torchrun
    quantize    block-wise 8-bit codes, 8-bit AdamW, NF4 weights, stochastic rounding to bfloat16
    tiling      VAE decoding in overlapping tiles: the decoder's memory bounded by a tile
    memory      peak GPU memory of a training step and of sampling, measured on a GPU or accounted on fake tensors
    budget      the 8 GB planner of SD 1.5's LoRA step: closed forms and accounted activations
    plotting    image grids and rows, noising strips, schedule curves, loss curves (matplotlib)
    widgets     the logic behind the notebooks' sliders (matplotlib; ipywidgets only in `live`)

Only plotting and widgets import matplotlib; only widgets imports ipywidgets.
"""

__version__ = "0.1.0"
