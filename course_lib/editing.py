r"""Image editing with the tiny Stable Diffusion: SDEdit (img2img), inpainting, and DDIM inversion.

All three start the reverse process somewhere other than fresh noise at T-1 and otherwise reuse the course's
parts: the VAE's latents (course_lib.vae.encode_latents: the posterior mean times the pipeline's scale
factor), guidance (course_lib.guidance.GuidedModel), the samplers and DDIM inversion (course_lib.sampling)
and the one generation path (course_lib.pipeline.text_to_image).

All three work on any path the pipeline samples (course_lib.schedules): on a rectified-flow pipeline (the tiny
SD 3, an MMDiT; notebook 14) the times are the flow's t in (0, 1], the grid is `FlowSchedule.grid`, and img2img's
strength picks the tail of that even grid (tested in tests/test_mmdit_tools.py).

Notation (course_lib.sampling; timesteps are integers 0..T-1, t = -1 is the clean end, abar_{-1} = 1):
    z0          the input images' scaled latents (B, C, h, w)
    n, k        the sampling grid's length (steps) and how many of its steps an edit runs
    m           the latent mask (B or 1, 1, h, w): 1 = repaint, 0 = keep

img2img (SDEdit [1]). Noise z0 part way, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, then run the reverse
process from t with the new prompt: the coarse layout of the input survives, the details follow the prompt.
`strength` picks t almost as diffusers' StableDiffusionImg2ImgPipeline does: of the n-step grid t_0 > ... > t_{n-1},
run the last k = round(strength * n) steps (halves round up), starting at t_{n-k}. diffusers truncates instead,
k = int(strength * n), so the two differ by one step wherever strength * n has a fractional part >= 0.5.
    strength 0   k = 0: nothing runs; the result is the VAE round trip decode(z0)
    strength 1   k = n: pure noise at t_0 = T-1, drawn exactly as text_to_image draws it (image j from
                 seed + j), so the result is pipe(prompts, seed=seed), the input ignored. (The scaled-linear
                 schedule leaves abar_{T-1} = 0.0047 > 0; diffusers would keep sqrt(0.0047) = 7% of z0 there.)
    in between   the k steps are the grid `timesteps(schedule, k, start=t_{n-k})` laid over 0..t_{n-k}: with
                 trailing spacing it starts at t_{n-k} exactly and is the tail of the n-step grid whenever
                 k T / n is whole (steps 10, 20, 25, 50 with T = 1000); otherwise an intermediate timestep can
                 differ from the tail's by one (`img2img_timesteps` says which timesteps run).

Inpainting, the "replace" method ([2] appendix; [3]). Sample as usual, but after every DDIM step to t' put
back the known region, noised to the same level: z_{t'} <- m z_{t'} + (1 - m) (sqrt(abar_{t'}) z0 +
sqrt(1 - abar_{t'}) eps'), fresh eps' each step; at the last step (t' = -1) the known latents are z0 itself.
The mask is given in pixels and max-pooled to the latent grid (f x f cells, f the VAE's factor): a latent cell
is repainted if any of its pixels is, so no part of the hole is pasted back from the input. The decoder
mixes neighbouring cells, so pixels near the hole change a little even outside it (keep_pixels pastes the
original pixels back outside the pixel mask after decoding).
RePaint's resampling [3] (Algorithm 1, U = `resample`): after the merge at t', jump back up to t with the
forward transition over the stride, z_t = sqrt(abar_t / abar_{t'}) z_{t'} + sqrt(1 - abar_t / abar_{t'}) eps,
and redo the step; U passes in all per step (U = 1: none), none at the last step. The denoising step itself is
deterministic DDIM (eta = 0) where RePaint used DDPM's ancestral step: the fresh noise of the jumps and of the
known region is what lets the unknown region harmonise with the known one. All fresh noise comes from
torch.Generator().manual_seed(seed) on the CPU, as text_to_image's stochastic samplers draw theirs.

DDIM inversion ([4] Sec. 4.3; [5]). course_lib.sampling.ddim_invert runs the eta = 0 update upwards from z0
under the source prompt; DDIM from the result walks back to about z0. Guidance scale 1 by default: with
guidance > 1 the inversion's update and the sampler's no longer undo each other, and the round trip drifts
(null-text inversion [5] optimises the empty prompt's states to fix that). Inverting to T-1 divides by
sqrt(abar_{T-1}) = 0.07 on the way back, which amplifies the model's errors (see ddim_invert's caveat): invert
only to start_t where abar is not tiny (e.g. 600, abar = 0.19) for a faithful round trip.

References:
  [1] Meng, He, Song, Song, Wu, Zhu, Ermon. SDEdit: Guided Image Synthesis and Editing with Stochastic
      Differential Equations. 2022. https://arxiv.org/abs/2108.01073
  [2] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
      Differential Equations. 2021. https://arxiv.org/abs/2011.13456
  [3] Lugmayr, Danelljan, Romero, Yu, Timofte, Van Gool. RePaint: Inpainting using Denoising Diffusion
      Probabilistic Models. 2022. https://arxiv.org/abs/2201.09865
  [4] Song, Meng, Ermon. Denoising Diffusion Implicit Models. 2021. https://arxiv.org/abs/2010.02502
  [5] Mokady, Hertz, Aberman, Pritch, Cohen-Or. Null-text Inversion for Editing Real Images using Guided
      Diffusion Models. 2023. https://arxiv.org/abs/2211.09794
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .checks import check_int
from .forward import check_images
from .pipeline import SamplerSettings, TextToImage, check_seed, guided, prompt_list, start_latents, text_to_image
from .sampling import ddim_invert, ddim_step, denoise, noised, renoised
from .vae import encode_latents


# --- checks and shared pieces -------------------------------------------------------------------------------

def _check_images(pipe: TextToImage, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] at the size the pipeline's latents decode to."""
    check_images(images, "images")
    C, h, w = pipe.latent_shape
    f = pipe.vae.config.factor
    expected = (pipe.vae.config.in_channels, h * f, w * f)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}) for this pipeline's VAE "
                         f"(latents {(C, h, w)}, factor {f}); got {tuple(images.shape)}")
    return images


def _per_image(prompts: str | list[str], B: int, what: str = "prompts") -> list[str]:
    """One prompt for every image, or one per image, as a list of B."""
    prompts = prompt_list(prompts, what)
    if len(prompts) == 1:
        return prompts * B
    if len(prompts) != B:
        raise ValueError(f"{what}: give one for every image, or one per image ({B}); got {len(prompts)}")
    return prompts


def _settings(pipe: TextToImage, steps: int | None, guidance_scale: float | None, **changes) -> SamplerSettings:
    settings = pipe.sampler_settings.replace(steps=steps, guidance_scale=guidance_scale, **changes)
    pipe.schedule.grid(settings.steps, settings.spacing, settings.offset, settings.start_t)   # checks them
    return settings


def _latents(pipe: TextToImage, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents z0 of the images (the posterior mean), on the pipeline's device."""
    return encode_latents(pipe.vae, images, pipe.scale_factor, device=pipe.device).to(pipe.device)


# --- img2img (SDEdit) ---------------------------------------------------------------------------------------

def _strength_steps(strength: float, steps: int) -> int:
    """k = round(strength * steps), halves rounded up: how many of the grid's steps img2img runs."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0: return the input, 1: ignore it and "
                         f"generate from pure noise); got {strength!r}")
    return min(int(math.floor(strength * steps + 0.5)), steps)


def img2img_timesteps(pipe: TextToImage, strength: float, steps: int | None = None) -> torch.Tensor:
    """The timesteps img2img runs at this strength (empty at strength 0; see the module's docstring)."""
    settings = _settings(pipe, steps, None)
    n, k = settings.steps, _strength_steps(strength, settings.steps)
    grid = pipe.schedule.grid(n, settings.spacing, settings.offset, settings.start_t)   # a flow path's: floats
    if k in (0, n):
        return torch.tensor(grid[n - k:])
    return torch.tensor(pipe.schedule.grid(k, settings.spacing, settings.offset, grid[n - k] - settings.offset))


@torch.no_grad()
def img2img(pipe: TextToImage, images: torch.Tensor, prompts: str | list[str], *, strength: float,
            steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
            negative_prompt: str | list[str] = "") -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise the images' latents to the timestep `strength` picks, then sample back
    with the prompts. Images (B, 3, H, W) in [-1, 1] on the CPU.

    images           (B, 3, H, W) in [-1, 1]; prompts: one, or one per image
    strength         in [0, 1]: run the last round(strength * steps) steps of the sampling grid (module docstring)
    steps, guidance_scale   the pipeline's sampler settings, as for a call (default 20 steps, guidance 4)
    seed             image j's noise from seed + j, as pipe(prompts, seed=seed) draws it
    negative_prompt  one, or one per image

    1. z0 = scale_factor * the VAE posterior's mean
    2. k = round(strength * steps); k = 0: return decode(z0); k = steps: sample from pure noise (= the pipeline)
    3. otherwise z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at the first timestep of `img2img_timesteps`
    4. run those k steps with guidance and the negative prompt (text_to_image, start_t = that timestep)
    """
    images = _check_images(pipe, images)
    B = images.shape[0]
    prompts = _per_image(prompts, B)
    negatives = _per_image(negative_prompt, B, "negative_prompt")
    seed = check_seed(seed)
    settings = _settings(pipe, steps, guidance_scale)
    n, k = settings.steps, _strength_steps(strength, settings.steps)
    z0 = _latents(pipe, images)
    if k == 0:
        return pipe.decode(z0)
    latents = None                                          # k = n: text_to_image's own noise, as pipe() draws it
    if k < n:
        ts = img2img_timesteps(pipe, strength, n)
        settings = settings.replace(steps=k, start_t=ts[0].item() - settings.offset)
        noise = start_latents(pipe.latent_shape, B, seed).to(pipe.device)
        latents = noised(pipe.schedule, z0, noise, ts[0].item())
    return text_to_image(pipe.unet, pipe.schedule, pipe.encode, pipe.decode, prompts, settings,
                         latent_shape=pipe.latent_shape, negative_prompt=negatives, seed=seed,
                         prediction=pipe.prediction, latents=latents, device=pipe.device)


# --- inpainting (replace + RePaint resampling) --------------------------------------------------------------

def latent_mask(pipe: TextToImage, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A pixel mask (B or 1, 1, H, W), 1 = repaint, 0 = keep, checked and max-pooled to the latent grid:
    (B or 1, 1, h, w) of 0/1, a cell repainted if any of its f x f pixels is (values above 0.5 count as 1)."""
    B, _, H, W = images.shape
    valid = f"({B}, 1, {H}, {W}) or (1, 1, {H}, {W})"
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[1] != 1 \
            or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (H, W):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape {valid} (1 = repaint, 0 = keep); got {got}")
    mask = mask.float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask must hold values in [0, 1] (1 = repaint, 0 = keep)")
    f = pipe.vae.config.factor
    return F.max_pool2d((mask > 0.5).float(), kernel_size=f, stride=f)


@torch.no_grad()
def inpaint(pipe: TextToImage, images: torch.Tensor, mask: torch.Tensor, prompts: str | list[str], *,
            steps: int | None = None, guidance_scale: float | None = None, seed: int = 0, resample: int = 1,
            negative_prompt: str | list[str] = "", keep_pixels: bool = False,
            return_latents: bool = False) -> torch.Tensor:
    """Inpainting by replacing the known region at every step (Song et al. 2021) with RePaint's resampling
    (Algorithm 1 of Lugmayr et al. 2022): images (B, 3, H, W) in [-1, 1] on the CPU.

    mask         (B or 1, 1, H, W) in pixels: 1 = repaint, 0 = keep; max-pooled to the latents (`latent_mask`)
    resample     U of RePaint: passes per step, each after the first jumping back up one step (1 = none)
    keep_pixels  paste the input's pixels back outside the mask after decoding (default: the decoded latents
                 everywhere, so the VAE's error outside the mask stays measurable)
    return_latents  the final latents (B, C, h, w) on the CPU instead: exactly z0 outside the latent mask
    steps, guidance_scale, negative_prompt   as for the pipeline; the steps are always DDIM with eta = 0

    1. z0 = the images' latents, m = the latent mask; z = noise (image j from seed + j), known region noised
    2. for t -> t' on the grid, U times: DDIM step with guidance; merge m z + (1 - m) q(z_{t'} | z0);
       before each pass after the first, jump back: z ~ q(z_t | z_{t'})
    3. decode (and, with keep_pixels, paste the input outside the mask)
    """
    images = _check_images(pipe, images)
    B = images.shape[0]
    prompts = _per_image(prompts, B)
    negatives = _per_image(negative_prompt, B, "negative_prompt")
    seed = check_seed(seed)
    resample = check_int("resample", resample, 1, hint=" (RePaint's U; 1 = no resampling)")
    m = latent_mask(pipe, mask, images).to(pipe.device)
    settings = _settings(pipe, steps, guidance_scale)
    ts = pipe.schedule.grid(settings.steps, settings.spacing, settings.offset, settings.start_t)
    clean = pipe.schedule.clean
    model = guided(pipe.unet, pipe.encode, prompts, negatives, settings)
    generator = torch.Generator().manual_seed(seed)

    def fresh() -> torch.Tensor:
        return torch.randn((B, *pipe.latent_shape), generator=generator).to(pipe.device)

    def merge(z: torch.Tensor, t: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        known = z0 if t == clean else noised(pipe.schedule, z0, fresh() if noise is None else noise, t)
        return m * z + (1 - m) * known

    z0 = _latents(pipe, images)
    noise = start_latents(pipe.latent_shape, B, seed).to(pipe.device)
    z = merge(noise, ts[0], noise)                          # the known region at t_0 from the same noise
    for t, t_next in zip(ts, ts[1:] + [clean]):
        for u in range(resample if t_next != clean else 1):
            if u > 0:                                       # RePaint's jump back up: z_t ~ q(z_t | z_t')
                z = renoised(pipe.schedule, z, t_next, t, fresh())
            x0_hat, eps_hat = denoise(model, pipe.schedule, z, t, prediction=pipe.prediction, clip_x0=False)
            z = merge(ddim_step(pipe.schedule, z, t, t_next, x0_hat, eps_hat), t_next)
    if return_latents:
        return z.float().cpu()
    out = pipe.decode(z)
    if keep_pixels:
        hole = (mask.float() > 0.5).float().cpu()
        out = hole * out + (1 - hole) * images.float().cpu()
    return out


# --- DDIM inversion -----------------------------------------------------------------------------------------

@torch.no_grad()
def invert(pipe: TextToImage, images: torch.Tensor, prompts: str | list[str], *, steps: int | None = None,
           guidance_scale: float = 1.0, start_t: int | None = None) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; course_lib.sampling.ddim_invert) of the images' latents
    under the prompts: the latents (B, C, h, w) at start_t (default T-1) on the CPU that DDIM (eta = 0, same
    steps, guidance and start_t) maps back to about the images' latents. Guidance 1 (the conditional model)
    by default: inverting with guidance > 1 drifts; the unguided pass uses the empty prompt."""
    images = _check_images(pipe, images)
    B = images.shape[0]
    settings = _settings(pipe, steps, guidance_scale, start_t=start_t, guidance_rescale=0.0, offset=0)
    model = guided(pipe.unet, pipe.encode, _per_image(prompts, B), [""] * B, settings)
    z = ddim_invert(model, pipe.schedule, _latents(pipe, images), steps=settings.steps, prediction=pipe.prediction,
                    spacing=settings.spacing, start_t=settings.start_t)
    return z.float().cpu()


@torch.no_grad()
def edit_with_inversion(pipe: TextToImage, images: torch.Tensor, source_prompts: str | list[str],
                        target_prompts: str | list[str], *, steps: int | None = None, guidance_scale: float = 1.0,
                        start_t: int | None = None) -> torch.Tensor:
    """Edit by DDIM inversion (Song et al. 2021; Mokady et al. 2023 without the null-text optimisation):
    invert the images under the source prompts, then sample with DDIM (eta = 0) from those latents under the
    target prompts, with the same steps, guidance scale and start_t. Images (B, 3, H, W) in [-1, 1] on the
    CPU; with target = source the result reconstructs the input up to the VAE's and the inversion's error."""
    images = _check_images(pipe, images)
    targets = _per_image(target_prompts, images.shape[0], "target_prompts")
    z = invert(pipe, images, source_prompts, steps=steps, guidance_scale=guidance_scale, start_t=start_t)
    settings = _settings(pipe, steps, guidance_scale, sampler="ddim", eta=0.0, start_t=start_t,
                         guidance_rescale=0.0, offset=0, final_t=-1)
    return text_to_image(pipe.unet, pipe.schedule, pipe.encode, pipe.decode, targets, settings,
                         latent_shape=pipe.latent_shape, prediction=pipe.prediction, latents=z, device=pipe.device)


__all__ = ["img2img_timesteps", "img2img", "latent_mask", "inpaint", "invert", "edit_with_inversion"]
