r"""Stable Diffusion 1.5, built from the course's own modules, with its published weights loaded into them.

Nothing new is invented here. SD 1.5 is the tiny text-to-image model of notebooks 06-09 at full size:

    part             course_lib module         SD 1.5's size                          tiny preset (tests, quick mode)
    U-Net            unet.UNet                 channels (320, 640, 1280, 1280), 860M   channels (32, 64), 1.1M
    VAE              vae.VAE                   512 px -> 4 x 64 x 64 (f = 8), 84M     64 px -> 4 x 8 x 8
    text encoder     text.TextEncoder          CLIP ViT-L/14's, 12 layers x 768, 123M  2 layers x 32
    tokenizer        clip_tokenizer            CLIP's byte-level BPE, 49,408 tokens    the 256 bytes, no merges
    noise schedule   schedules                 scaled_linear, 0.00085 -> 0.012, T = 1000
    sampler          sampling                  DDIM, "leading" timesteps + 1, guidance 7.5

Three settings make the course's U-Net SD's (see course_lib.unet): a fixed 8 heads per attention layer,
additive time conditioning, and SD's skip layout (conv_in's output and every downsampled map are skips too,
so each level going up has 3 ResBlocks). The VAE needs GroupNorm's epsilon at 1e-6 and SD's asymmetric
padding before each stride-2 conv; the text encoder is causal with OpenAI's quick GELU.

Weights. `convert_state_dict` renames a published state dict into course_lib's names, from either
    "diffusers"  the folder layout of the Hugging Face hub (unet/, vae/, text_encoder/, tokenizer/), or
    "original"   the single file of the original release (v1-5-pruned-emaonly.safetensors; keys
                 model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)
Every tensor is accounted for: a key the model needs but the file lacks, or a key in the file that nothing
uses, raises CheckpointMismatch naming them, so a renamed layer can never be skipped silently.
Three places change shape on the way: course_lib fuses the query, key and value projections of the VAE's and
the text encoder's attention into one `qkv` layer (the three are stacked), and the original VAE stores its
attention projections as 1x1 convolutions (the same numbers as a linear layer's weight).

8 GB. A 512 x 512 image is a 64 x 64 latent, 4,096 tokens in the first attention layers. What keeps SD 1.5 in
8 GB: float16 weights (1.7 GB for the U-Net instead of 3.4), attention through scaled_dot_product_attention
(flash / memory-efficient kernels never store the 4,096 x 4,096 score matrix), decoding one image at a time
(VAE slicing), and for training gradient checkpointing plus LoRA, so there are gradients and Adam moments only
for the adapters. scripts/measure_sd15_memory.py measures the peaks.

References: Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (the model); Song et al. 2021,
https://arxiv.org/abs/2010.02502 (DDIM); Ho & Salimans 2022, https://arxiv.org/abs/2207.12598 (guidance).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .clip_tokenizer import CLIPTokenizer, bytes_to_unicode
from .lora import inject_lora, lora_layers, lora_parameters
from .sampling import GuidedModel, sample
from .schedules import NoiseSchedule, scaled_linear_schedule
from .text import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

SOURCES = ("diffusers", "original")


# --- Configs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SDConfig:
    """The three networks of a Stable Diffusion and the number its latents are multiplied by."""
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    scale_factor: float = 0.18215            # 1 / std of the VAE's latents ([Rombach et al.] appendix D.1)

    def __post_init__(self):
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"the U-Net cross-attends to {self.unet.context_dim}-d states but the text encoder "
                             f"gives {self.text.width}-d ones")
        if self.unet.in_channels != self.vae.latent_channels:
            raise ValueError(f"the U-Net takes {self.unet.in_channels} channels; the VAE's latents have "
                             f"{self.vae.latent_channels}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


SD15 = SDConfig(
    unet=UNetConfig(image_size=64, in_channels=4, out_channels=4, channels=(320, 640, 1280, 1280),
                    blocks_per_level=2, attention=(True, True, True, False), num_heads=8, norm_groups=32,
                    time_conditioning="add", context_dim=768, sd_skips=True),
    vae=VAEConfig(image_size=512, channels=(128, 256, 512, 512), blocks_per_level=2, latent_channels=4,
                  norm_groups=32, norm_eps=1e-6, asymmetric_padding=True),
    text=TextEncoderConfig(vocab_size=49408, max_length=77, width=768, layers=12, heads=12, mlp_ratio=4,
                           causal=True, activation="quick_gelu"),
)

# The same shapes of network, small enough for a CPU: quick mode and the tests. vocab_size 514 is the byte-level
# tokenizer of `tiny_tokenizer` (256 bytes, each also with </w>, and the two special tokens).
TINY = SDConfig(
    unet=UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=(32, 64), blocks_per_level=2,
                    attention=(True, False), num_heads=2, norm_groups=8, time_conditioning="add",
                    context_dim=32, sd_skips=True),
    vae=VAEConfig(image_size=64, channels=(16, 32, 32, 32), blocks_per_level=1, latent_channels=4,
                  norm_groups=8, norm_eps=1e-6, asymmetric_padding=True),
    text=TextEncoderConfig(vocab_size=514, max_length=77, width=32, layers=2, heads=4, mlp_ratio=4,
                           causal=True, activation="quick_gelu"),
)

PRESETS: dict[str, SDConfig] = {"sd15": SD15, "tiny": TINY}


def get_preset(name: str) -> SDConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Stable Diffusion preset {name!r}; valid are {', '.join(PRESETS)}")
    return PRESETS[name]


def tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (with </w> at a word's end). It needs no files,
    so the tiny random model can read prompts; its 514 ids match TINY.text.vocab_size."""
    chars = list(bytes_to_unicode().values())
    pieces = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({p: i for i, p in enumerate(pieces)}, [], max_length=max_length)


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """A UNetConfig from diffusers' unet/config.json (UNet2DConditionModel), for the SD 1.x layout."""
    down = config.get("down_block_types", [])
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not down or set(down) - known or config.get("use_linear_projection") or \
            config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"only the SD 1.x U-Net layout converts (down blocks {sorted(known)}, conv proj_in); "
                         f"got down_block_types={down}, use_linear_projection={config.get('use_linear_projection')}")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if not isinstance(heads, int):
        raise ValueError(f"a different number of heads per level is not supported; got {heads}")
    layers = config.get("transformer_layers_per_block", 1)
    if not isinstance(layers, int):
        raise ValueError(f"one transformer depth for all levels is supported; got {layers}")
    eps = config.get("norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"the U-Net's GroupNorms use eps 1e-5 (SD 1.x); got norm_eps={eps}")
    return UNetConfig(image_size=config.get("sample_size", 64), in_channels=config.get("in_channels", 4),
                      out_channels=config.get("out_channels", 4), channels=tuple(config["block_out_channels"]),
                      blocks_per_level=config.get("layers_per_block", 2),
                      attention=tuple(t == "CrossAttnDownBlock2D" for t in down), num_heads=heads,
                      norm_groups=config.get("norm_num_groups", 32), time_conditioning="add",
                      context_dim=config.get("cross_attention_dim", 768), transformer_depth=layers, sd_skips=True)


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """A VAEConfig from diffusers' vae/config.json (AutoencoderKL)."""
    return VAEConfig(image_size=config.get("sample_size", 512), in_channels=config.get("in_channels", 3),
                     channels=tuple(config["block_out_channels"]), blocks_per_level=config.get("layers_per_block", 2),
                     latent_channels=config.get("latent_channels", 4), norm_groups=config.get("norm_num_groups", 32),
                     norm_eps=1e-6, asymmetric_padding=True)


def text_config_from_transformers(config: dict) -> TextEncoderConfig:
    """A TextEncoderConfig from transformers' text_encoder/config.json (CLIPTextModel)."""
    width = config["hidden_size"]
    inner = config.get("intermediate_size", 4 * width)
    if inner % width:
        raise ValueError(f"the MLP's width must be a multiple of hidden_size ({width}); got {inner}")
    return TextEncoderConfig(vocab_size=config["vocab_size"], max_length=config.get("max_position_embeddings", 77),
                             width=width, layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                             mlp_ratio=inner // width, causal=True, activation=config.get("hidden_act", "quick_gelu"))


# --- Weight conversion ----------------------------------------------------------------------------------

class CheckpointMismatch(KeyError):
    """A state dict that does not fit the model: names the missing and the unexpected keys."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], shapes: list[str] = ()):
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"the {what} weights do not fit course_lib's {what}:"]
        if missing:
            parts.append(f"missing keys (the model needs them, the file lacks them): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the file, used by nothing): {show(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {show(list(shapes))}")
        parts.append("Check that the file is an SD 1.x checkpoint and `source` is right "
                     f"({' or '.join(SOURCES)}).")
        self.missing, self.unexpected, self.shapes = missing, unexpected, list(shapes)
        super().__init__("\n".join(parts))

    def __str__(self) -> str:                 # KeyError would show the message in quotes, on one line
        return self.args[0]


# Inside a ResBlock, attention layer and so on, the names differ only in their last parts.
_UNET_RES = {"diffusers": {"norm1": "norm1", "conv1": "conv1", "time_proj": "time_emb_proj", "norm2": "norm2",
                           "conv2": "conv2", "skip": "conv_shortcut"},
             "original": {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_proj": "emb_layers.1",
                          "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}}
_VAE_RES = {"diffusers": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                          "skip": "conv_shortcut"},
            "original": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                         "skip": "nin_shortcut"}}
_VAE_ATTN = {"diffusers": {"norm": "group_norm", "qkv": ("to_q", "to_k", "to_v"), "out": "to_out.0"},
             "original": {"norm": "norm", "qkv": ("q", "k", "v"), "out": "proj_out"}}


def _spatial_transformer_leaf(rest: str) -> str:
    """course_lib's names inside a SpatialTransformer -> SD's (the same in both sources)."""
    rest = re.sub(r"^blocks\.(\d+)\.", r"transformer_blocks.\1.", rest)
    rest = re.sub(r"\.(attn\d)\.to_out\.", r".\1.to_out.0.", rest)
    rest = rest.replace(".ff.proj.", ".ff.net.0.proj.").replace(".ff.out.", ".ff.net.2.")
    return rest


def _unet_prefixes(cfg: UNetConfig, source: str) -> list[tuple[str, str, str]]:
    """(course_lib prefix, source prefix, kind) for every part of SD's U-Net, walking it in order."""
    orig = source == "original"
    out = [("time_embed.mlp.0", "time_embed.0" if orig else "time_embedding.linear_1", "plain"),
           ("time_embed.mlp.2", "time_embed.2" if orig else "time_embedding.linear_2", "plain"),
           ("conv_in", "input_blocks.0.0" if orig else "conv_in", "plain")]
    n = 1                                                   # the original numbers the way down in one sequence
    for level in range(cfg.levels):
        for i in range(cfg.blocks_per_level):
            src = f"input_blocks.{n}" if orig else f"down_blocks.{level}"
            out.append((f"down.{level}.{i}.res", f"{src}.0" if orig else f"{src}.resnets.{i}", "res"))
            out.append((f"down.{level}.{i}.attn", f"{src}.1" if orig else f"{src}.attentions.{i}", "attn"))
            n += 1
        if level < cfg.levels - 1:
            out.append((f"downsample.{level}.conv", f"input_blocks.{n}.0.op" if orig
                        else f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            n += 1
    mid = "middle_block" if orig else "mid_block"
    out += [("mid1.res", f"{mid}.0" if orig else f"{mid}.resnets.0", "res"),
            ("mid1.attn", f"{mid}.1" if orig else f"{mid}.attentions.0", "attn"),
            ("mid2.res", f"{mid}.2" if orig else f"{mid}.resnets.1", "res")]
    n = 0
    per_level = cfg.blocks_per_level + 1
    for k in range(cfg.levels):                             # k = 0 is the lowest resolution
        has_attn = cfg.attention[cfg.levels - 1 - k]
        for i in range(per_level):
            src = f"output_blocks.{n}" if orig else f"up_blocks.{k}"
            out.append((f"up.{k}.{i}.res", f"{src}.0" if orig else f"{src}.resnets.{i}", "res"))
            out.append((f"up.{k}.{i}.attn", f"{src}.1" if orig else f"{src}.attentions.{i}", "attn"))
            if i == per_level - 1 and k < cfg.levels - 1:
                out.append((f"upsample.{k}.conv", f"{src}.{2 if has_attn else 1}.conv" if orig
                            else f"up_blocks.{k}.upsamplers.0.conv", "plain"))
            n += 1
    out += [("norm_out", "out.0" if orig else "conv_norm_out", "plain"),
            ("conv_out", "out.2" if orig else "conv_out", "plain")]
    return out


def _vae_prefixes(cfg: VAEConfig, source: str) -> list[tuple[str, str, str]]:
    orig = source == "original"
    L, b = len(cfg.channels), cfg.blocks_per_level
    out = [("quant_conv", "quant_conv", "plain"), ("post_quant_conv", "post_quant_conv", "plain")]
    for part in ("encoder", "decoder"):
        mid = f"{part}.mid" if orig else f"{part}.mid_block"
        out += [(f"{part}.conv_in", f"{part}.conv_in", "plain"),
                (f"{part}.mid.0", f"{mid}.block_1" if orig else f"{mid}.resnets.0", "res"),
                (f"{part}.mid.1", f"{mid}.attn_1" if orig else f"{mid}.attentions.0", "attn"),
                (f"{part}.mid.2", f"{mid}.block_2" if orig else f"{mid}.resnets.1", "res"),
                (f"{part}.norm_out", f"{part}.norm_out" if orig else f"{part}.conv_norm_out", "plain"),
                (f"{part}.conv_out", f"{part}.conv_out", "plain")]
    for level in range(L):
        src = f"encoder.down.{level}" if orig else f"encoder.down_blocks.{level}"
        for i in range(b):
            out.append((f"encoder.down.{level}.{i}", f"{src}.block.{i}" if orig else f"{src}.resnets.{i}", "res"))
        if level < L - 1:
            out.append((f"encoder.down.{level}.{b}.conv", f"{src}.downsample.conv" if orig
                        else f"{src}.downsamplers.0.conv", "plain"))
    for k in range(L):                                      # decoder: k = 0 is the lowest resolution
        src = f"decoder.up.{L - 1 - k}" if orig else f"decoder.up_blocks.{k}"   # the original counts from the top
        for i in range(b + 1):
            out.append((f"decoder.up.{k}.{i}", f"{src}.block.{i}" if orig else f"{src}.resnets.{i}", "res"))
        if k < L - 1:
            out.append((f"decoder.up.{k}.{b + 1}.conv", f"{src}.upsample.conv" if orig
                        else f"{src}.upsamplers.0.conv", "plain"))
    return out


def _sources_for(key: str, prefixes: list[tuple[str, str, str]], res: dict, attn: dict | None) -> tuple[str, ...]:
    """The source key(s) that make course_lib's `key` (three for a fused qkv)."""
    for ours, src, kind in prefixes:
        if not key.startswith(ours + "."):
            continue
        rest = key[len(ours) + 1:]                          # e.g. "time_proj.weight"
        head, _, leaf = rest.partition(".")
        if kind == "plain":
            return (f"{src}.{rest}",)
        if kind == "res":
            return (f"{src}.{res[head]}.{leaf}",)
        if attn is None:                                    # the U-Net's SpatialTransformer
            return (f"{src}.{_spatial_transformer_leaf(rest)}",)
        names = attn[head]                                  # the VAE's single-head attention
        return tuple(f"{src}.{n}.{leaf}" for n in names) if isinstance(names, tuple) else (f"{src}.{names}.{leaf}",)
    raise KeyError(f"no rule converts course_lib key {key!r}")


def _text_sources(key: str, layer_prefix: str) -> tuple[str, ...]:
    """transformers' CLIPTextModel names (under layer_prefix, e.g. "text_model.") for a TextEncoder key."""
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "position_embedding": "embeddings.position_embedding.weight",
             "norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias"}
    if key in fixed:
        return (layer_prefix + fixed[key],)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise KeyError(f"no rule converts course_lib key {key!r}")
    i, part, leaf = m.groups()
    src = f"{layer_prefix}encoder.layers.{i}."
    parts = {"norm1": ("layer_norm1",), "norm2": ("layer_norm2",), "attn.out": ("self_attn.out_proj",),
             "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.0": ("mlp.fc1",), "mlp.2": ("mlp.fc2",)}
    return tuple(f"{src}{p}.{leaf}" for p in parts[part])


# Keys a published checkpoint may hold that no computation uses: a buffer of position indices, and (in some original
# files, under first_stage_model.) the autoencoder's training losses, its LPIPS network and discriminator.
_IGNORED = re.compile(r"(^|\.)position_ids$|^loss\.")


def key_map(model: nn.Module, source: str, state_keys: set[str] | None = None) -> dict[str, tuple[str, ...]]:
    """course_lib key -> the source key(s) it is made from, for a UNet, VAE or TextEncoder in SD's layout.
    Three source keys stand behind a fused qkv. state_keys (optional): the source's keys, used only to tell
    whether a text encoder's names start with "text_model." (transformers >= 4.x writes them so)."""
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; valid are {', '.join(SOURCES)}")
    if isinstance(model, UNet):
        if not (model.config.sd_skips and model.config.time_conditioning == "add"):
            raise ValueError("only a U-Net in SD's layout (sd_skips=True, time_conditioning='add') takes SD weights")
        prefixes = _unet_prefixes(model.config, source)
        find = lambda k: _sources_for(k, prefixes, _UNET_RES[source], None)       # noqa: E731
    elif isinstance(model, VAE):
        prefixes = _vae_prefixes(model.config, source)
        find = lambda k: _sources_for(k, prefixes, _VAE_RES[source], _VAE_ATTN[source])  # noqa: E731
    elif isinstance(model, TextEncoder):
        inner = "text_model." if state_keys is None or any(k.startswith("text_model.") for k in state_keys) else ""
        find = lambda k: _text_sources(k, inner)                                   # noqa: E731
    else:
        raise TypeError(f"SD weights convert into a UNet, VAE or TextEncoder; got {type(model).__name__}")
    return {key: find(key) for key in model.state_dict()}


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module, source: str, prefix: str = "",
                       what: str | None = None) -> dict[str, torch.Tensor]:
    """Rename a published state dict into `model`'s names (UNet, VAE or TextEncoder), checking every key.

    source  "diffusers" (the hub's folder layout; for the text encoder, transformers' names) or "original"
            (the single-file release); prefix: what the source keys start with (e.g. "model.diffusion_model."
            in an original file; only keys under it are considered). Returns a state dict for
            model.load_state_dict(..., strict=True). Raises CheckpointMismatch for missing, unexpected or
            wrongly shaped tensors."""
    what = what or {UNet: "U-Net", VAE: "VAE", TextEncoder: "text encoder"}.get(type(model), type(model).__name__)
    available = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mapping = key_map(model, source, set(available))
    targets = model.state_dict()
    used, out, missing, shapes = set(), {}, [], []
    for key, target in targets.items():
        names = mapping[key]
        absent = [prefix + n for n in names if n not in available]
        used.update(n for n in names if n in available)        # accounted for, even if a sibling is missing
        if absent:
            missing += absent
            continue
        tensor = torch.cat([available[n] for n in names]) if len(names) > 1 else available[names[0]]
        if tensor.numel() != target.numel():
            shapes.append(f"{prefix + names[0]} {tuple(tensor.shape)} for {key} {tuple(target.shape)}")
            continue
        out[key] = tensor.reshape(target.shape)           # 1x1 conv weights (original VAE attention) -> linear
    unexpected = [prefix + k for k in available if k not in used and not _IGNORED.search(k)]
    if missing or unexpected or shapes:
        raise CheckpointMismatch(what, missing, unexpected, shapes)
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> nn.Module:
    """Convert `state` (see convert_state_dict) and load it into `model` in place, keeping the model's dtype."""
    converted = convert_state_dict(state, model, source, prefix)
    model.load_state_dict(converted, strict=True)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: .safetensors, or .ckpt/.bin/.pt through torch.load(weights_only=True)
    (a pickle that can only hold tensors, so opening a downloaded file cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ValueError(f"unknown checkpoint format {path.suffix!r} ({path}); valid are .safetensors, .ckpt, .bin, "
                     f".pt, .pth")


# --- The pipeline ------------------------------------------------------------------------------------------

class _Cast(nn.Module):
    """A U-Net whose inputs are cast to its weights' dtype and whose output comes back in float32, so the
    sampler keeps its latents in float32 while a float16 U-Net does the work."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context=None, mask=None):
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(x.to(dtype), t, None if context is None else context.to(dtype), mask).float()


class StableDiffusion:
    """Text to image with SD 1.5's parts in course_lib's modules.

    sd = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")     # a diffusers folder, or
    sd = StableDiffusion.from_pretrained("v1-5-pruned-emaonly.safetensors", tokenizer="path/to/tokenizer")
    images = sd("a watercolour fox", seed=0)                                  # (1, 3, 512, 512) in [-1, 1]
    sd = StableDiffusion.random("tiny")                                       # no files: quick mode, tests
    """

    def __init__(self, unet: UNet, vae: VAE, text_encoder: TextEncoder, tokenizer: CLIPTokenizer,
                 scale_factor: float = 0.18215, schedule: NoiseSchedule | None = None):
        if unet.config.context_dim != text_encoder.config.width:
            raise ValueError(f"the U-Net attends to {unet.config.context_dim}-d states; the text encoder gives "
                             f"{text_encoder.config.width}-d ones")
        if tokenizer.vocab_size > text_encoder.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens; the text encoder embeds only "
                             f"{text_encoder.config.vocab_size}")
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet.eval(), vae.eval(), text_encoder.eval(), tokenizer
        self.scale_factor = float(scale_factor)
        self.schedule = schedule or scaled_linear_schedule(1000, 0.00085, 0.012)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def factor(self) -> int:
        return self.vae.config.factor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder))}

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def random(cls, preset: str | SDConfig = "tiny", seed: int = 0, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, tokenizer: CLIPTokenizer | None = None) -> "StableDiffusion":
        """Random weights in SD's shapes: for quick mode and tests (tiny), or to measure memory (sd15; the
        memory a network needs does not depend on the values of its weights). Without `tokenizer` it gets the
        byte-level `tiny_tokenizer` (its ids fit both presets' vocabularies; pass CLIP's to read prompts as SD does)."""
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        if tokenizer is None:
            tokenizer = tiny_tokenizer(cfg.text.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                unet, vae, text = UNet(cfg.unet), VAE(cfg.vae), TextEncoder(cfg.text)
            # proj_out starts at zero in a new SpatialTransformer; random weights there make cross-attention
            # (and so the prompt) matter in the random model, as it does in a trained one
            for m in unet.modules():
                if hasattr(m, "proj_out") and isinstance(m.proj_out, nn.Conv2d):
                    nn.init.normal_(m.proj_out.weight, std=0.02)
        return cls(unet.to(dtype), vae.to(dtype), text.to(dtype), tokenizer, cfg.scale_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | CLIPTokenizer | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        config: SDConfig = SD15) -> "StableDiffusion":
        """Load SD 1.x weights from a local path into course_lib's modules.

        path  a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/), or one original
              checkpoint file (.safetensors; .ckpt through torch.load(weights_only=True)), which holds no tokenizer:
              pass tokenizer= a folder with CLIP's vocab.json and merges.txt (e.g. a diffusers download's tokenizer/).
        The networks are built on the meta device (no memory), then filled in `dtype` on `device`."""
        path = Path(path)
        if path.is_dir():
            return cls._from_diffusers(path, tokenizer, device, dtype)
        if not path.exists():
            raise FileNotFoundError(f"no Stable Diffusion weights at {path}: give a diffusers folder (with unet/, "
                                    f"vae/, text_encoder/, tokenizer/) or an original single-file checkpoint")
        if tokenizer is None:
            raise ValueError("an original single-file checkpoint holds no tokenizer: pass tokenizer= a folder with "
                             "CLIP's vocab.json and merges.txt (for example the tokenizer/ folder of a diffusers "
                             "download of SD 1.5)")
        tok = tokenizer if isinstance(tokenizer, CLIPTokenizer) else CLIPTokenizer.from_directory(tokenizer)
        state = read_state_dict(path)
        text_prefix = "cond_stage_model.transformer."
        parts = [("model.diffusion_model.", UNet, config.unet), ("first_stage_model.", VAE, config.vae),
                 (text_prefix, TextEncoder, config.text)]
        models = []
        for prefix, kind, cfg in parts:
            models.append(_load_part(kind, cfg, {k: v for k, v in state.items() if k.startswith(prefix)},
                                     "original", prefix, device, dtype))
        return cls(*models, tok, config.scale_factor)

    @classmethod
    def _from_diffusers(cls, path: Path, tokenizer, device, dtype) -> "StableDiffusion":
        def weights(folder: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
            for name in names:
                if (path / folder / name).is_file():
                    return read_state_dict(path / folder / name)
            raise FileNotFoundError(f"no weights in {path / folder}: expected one of {', '.join(names)}")

        def config(folder: str) -> dict:
            file = path / folder / "config.json"
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing: a diffusers folder has unet/, vae/ and text_encoder/, "
                                        f"each with a config.json")
            return json.loads(file.read_text())

        diffusers_names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.bin")
        text_names = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
        unet = _load_part(UNet, unet_config_from_diffusers(config("unet")), weights("unet", diffusers_names),
                          "diffusers", "", device, dtype)
        vae_json = config("vae")
        vae = _load_part(VAE, vae_config_from_diffusers(vae_json), weights("vae", diffusers_names),
                         "diffusers", "", device, dtype)
        text = _load_part(TextEncoder, text_config_from_transformers(config("text_encoder")),
                          weights("text_encoder", text_names), "diffusers", "", device, dtype)
        if tokenizer is None:
            tokenizer = CLIPTokenizer.from_directory(path)
        elif not isinstance(tokenizer, CLIPTokenizer):
            tokenizer = CLIPTokenizer.from_directory(tokenizer)
        return cls(unet, vae, text, tokenizer, vae_json.get("scaling_factor", 0.18215))

    @classmethod
    def from_diffusers_modules(cls, unet, vae, text_encoder, tokenizer: CLIPTokenizer) -> "StableDiffusion":
        """From diffusers' / transformers' model objects in memory (UNet2DConditionModel, AutoencoderKL,
        CLIPTextModel): their configs and state dicts, converted. Used by the parity tests."""
        dtype = next(unet.parameters()).dtype
        return cls(_load_part(UNet, unet_config_from_diffusers(dict(unet.config)), unet.state_dict(),
                              "diffusers", "", "cpu", dtype),
                   _load_part(VAE, vae_config_from_diffusers(dict(vae.config)), vae.state_dict(),
                              "diffusers", "", "cpu", dtype),
                   _load_part(TextEncoder, text_config_from_transformers(text_encoder.config.to_dict()),
                              text_encoder.state_dict(), "diffusers", "", "cpu", dtype),
                   tokenizer, vae.config.get("scaling_factor", 0.18215))

    # --- using ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """The text encoder's states (B, 77, width) for the prompts: every position, padding included, as SD
        uses them (no mask)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, _ = self.tokenizer(prompts)
        return self.text_encoder(ids.to(self.device), None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, slicing: bool = True) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, on the CPU). slicing: one image at a time (the decoder's
        activations at full resolution are the largest tensors of generation)."""
        dtype = self.vae.post_quant_conv.weight.dtype
        z = latents.to(self.device, dtype) / self.scale_factor
        parts = z.split(1) if slicing else (z,)
        return torch.cat([self.vae.decode(p).float().clamp(-1, 1).cpu() for p in parts])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior means times scale_factor), one image at a time."""
        dtype = self.vae.post_quant_conv.weight.dtype
        return torch.cat([self.vae.encode(x.to(self.device, dtype)).mean.float() * self.scale_factor
                          for x in images.split(1)])

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, negative_prompt: str = "", steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                 latents: torch.Tensor | None = None, sampler: str = "ddim", return_latents: bool = False,
                 vae_slicing: bool = True, progress: bool = False) -> torch.Tensor:
        """Images (B, 3, height, width) in [-1, 1] on the CPU, one per prompt.

        Sampling follows SD 1.5's published scheduler: scaled_linear betas, timesteps "leading" + 1 (981, 961,
        ..., 1 for 50 steps), the last step landing on abar_0. Image k starts from the noise of seed + k
        (drawn on the CPU, so a seed gives the same image on any device) unless `latents` are given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r}")
        size = self.vae.config.image_size
        height, width = height or size, width or size
        f = self.factor * 2 ** (self.unet.config.levels - 1)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < f or v % f:
                raise ValueError(f"{name} must be a multiple of {f} (the VAE's factor {self.factor} times the "
                                 f"U-Net's {f // self.factor}); got {v!r}")
        shape = (len(prompts), self.unet.config.in_channels, height // self.factor, width // self.factor)
        if latents is None:
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(seed + k))
                                 for k in range(len(prompts))])
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {len(prompts)} prompt(s) at {height}x{width}; "
                             f"got {tuple(latents.shape)}")
        context = self.encode(prompts)
        null = self.encode([negative_prompt] * len(prompts))
        model = GuidedModel(_Cast(self.unet), context, None, null, None, float(guidance_scale))
        z = sample(model, self.schedule, shape, sampler=sampler, steps=steps, x_T=latents.float().to(self.device),
                   clip_x0=False, spacing="leading", offset=1, final_t=0, progress=progress)
        return z.cpu() if return_latents else self.decode(z, slicing=vae_slicing)

    # --- fine-tuning -------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, gradient_checkpointing: bool = True) -> list:
        """LoRA adapters on the U-Net's attention projections (to_q, to_k, to_v, to_out), kept in float32 while
        the frozen base stays in its dtype; returns the trainable parameters (the existing ones if the U-Net
        already has adapters). Gradient checkpointing recomputes
        each Block's activations in the backward pass instead of storing them."""
        if not lora_layers(self.unet):                    # called again: keep training the adapters it has
            self.unet.requires_grad_(False)
            inject_lora(self.unet, rank=rank, alpha=alpha)
        params = lora_parameters(self.unet)
        for p in params:
            p.data = p.data.float()
        if gradient_checkpointing:
            self.unet.config = self.unet.config.replace(gradient_checkpointing=True)
        return params

    def lora_loss(self, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss (epsilon prediction, SD's objective) on scaled latents with text states, under
        float16 autocast on a GPU (the frozen base in float16, the adapters' master weights in float32)."""
        B = latents.shape[0]
        t = torch.randint(0, self.schedule.T, (B,), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        abar = self.schedule.extract(self.schedule.alphas_cumprod, t, latents).float()
        zt = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        self.unet.train()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            out = self.unet(zt.to(self.dtype), t, context.to(self.dtype))
        self.unet.eval()
        return F.mse_loss(out.float(), noise)


@dataclass
class LoRARun:
    """What `fine_tune_lora` did: the loss at every step, the seconds spent in steps, the trainable count."""
    losses: list[float]
    seconds: float
    trainable: int


def fine_tune_lora(model: StableDiffusion, images: torch.Tensor, captions: list[str], *, steps: int,
                   rank: int = 4, lr: float = 1e-4, batch_size: int = 1, seed: int = 0,
                   gradient_checkpointing: bool = True, progress: bool = True) -> LoRARun:
    """LoRA on SD's attention projections from (images in [-1, 1], captions): SD's fine-tuning recipe at its
    smallest. The images are encoded once (posterior means) and the captions once, so a step is one U-Net
    forward and backward. On a GPU the frozen base runs in float16 under autocast, with a GradScaler so that
    small float16 gradients do not underflow to zero; the adapters' weights and Adam moments stay float32."""
    if len(images) != len(captions):
        raise ValueError(f"one caption per image: got {len(images)} images and {len(captions)} captions")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    size = model.vae.config.factor * 2 ** (model.unet.config.levels - 1)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % size or images.shape[3] % size:
        raise ValueError(f"images must be (N, 3, H, W) with H and W multiples of {size}; got {tuple(images.shape)}")
    latents = model.encode_images(images)
    context = model.encode(captions).float()
    params = model.add_lora(rank=rank, gradient_checkpointing=gradient_checkpointing)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    on_gpu = model.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if on_gpu and model.dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(seed)
    losses, seconds = [], 0.0
    for _ in tqdm(range(steps), desc="LoRA", disable=not progress):
        t0 = time.perf_counter()
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = model.lora_loss(latents[index].to(model.device), context[index], generator)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        seconds += time.perf_counter() - t0
    return LoRARun(losses, seconds, sum(p.numel() for p in params))


def _load_part(kind: type, cfg, state: dict, source: str, prefix: str, device, dtype) -> nn.Module:
    """Build a network on the meta device (no memory, no random init), give it real storage on `device`, then
    copy the converted weights in, cast to dtype."""
    with torch.device("meta"):
        model = kind(cfg)
    converted = convert_state_dict(state, model, source, prefix)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True)
    return model.to(dtype)


__all__ = ["SDConfig", "SD15", "TINY", "PRESETS", "get_preset", "tiny_tokenizer", "CheckpointMismatch",
           "unet_config_from_diffusers", "vae_config_from_diffusers", "text_config_from_transformers",
           "key_map", "convert_state_dict", "load_weights", "read_state_dict", "StableDiffusion", "LoRARun",
           "fine_tune_lora"]
