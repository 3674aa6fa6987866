r"""Reading Stable Diffusion 1.x's published weights into course_lib's modules (notebook 18).

A published checkpoint names its tensors after the code that trained it; course_lib's U-Net, VAE and text
encoder name theirs after the course. `key_map` says, for every tensor of ours, which tensor(s) of the file
make it, from either
    "diffusers"  the folder layout of the Hugging Face hub (unet/, vae/, text_encoder/, tokenizer/; the text
                 encoder under transformers' CLIPTextModel names), or
    "original"   the single file of the original release (v1-5-pruned-emaonly.safetensors; keys
                 model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*)
and `convert_state_dict` applies it. Every tensor is accounted for: a key the model needs but the file
lacks, or a key in the file that nothing uses, raises CheckpointMismatch naming them, so a renamed layer
can never be skipped silently. Three places change shape on the way: course_lib fuses the query, key and
value projections of the VAE's and the text encoder's attention into one `qkv` layer (the three are
stacked), and the original VAE stores its attention projections as 1x1 convolutions (the same numbers as a
linear layer's weight).

The configs come from the files too: `unet_config_from_diffusers`, `vae_config_from_diffusers` and
`text_config_from_transformers` read diffusers' and transformers' config.json into course_lib's configs.
`load_network` builds a network on the meta device (no memory, no random init) and fills it with converted
weights; `load_diffusers_folder` and `load_original_file` do that for all three networks of a download.
Files are read by `read_state_dict`: safetensors, or torch.load(weights_only=True), which cannot run code.

Used by course_lib.sd.StableDiffusion.from_pretrained; checked against diffusers' own single-file converter
and against diffusers' / transformers' outputs by tests/test_sd.py and scripts/sd_parity.py.

References: Rombach et al. 2022, https://arxiv.org/abs/2112.10752 (the model and its original release).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .checks import check_choice
from .text import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

SOURCES = ("diffusers", "original")
ORIGINAL_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                     "text": "cond_stage_model.transformer."}      # where each network's keys sit in one file
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")


# --- Configs -----------------------------------------------------------------------------------------

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


# --- Weight names -------------------------------------------------------------------------------------

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
    check_choice("checkpoint source", source, SOURCES)
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
    if path.suffix not in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ValueError(f"unknown checkpoint format {path.suffix!r} ({path}); valid are .safetensors, .ckpt, .bin, "
                         f".pt, .pth")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, EOFError, OSError, RuntimeError) as error:
        raise ValueError(f"{path} could not be read as a {path.suffix} checkpoint ({type(error).__name__}: {error}): "
                         f"it is truncated, corrupt or of another format. Download it again (and check its size "
                         f"against the source's)") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


# --- Building the networks ------------------------------------------------------------------------------

def load_network(kind: type, config, state: dict[str, torch.Tensor], source: str, prefix: str = "",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A UNet, VAE or TextEncoder (`kind`) of `config` holding the converted `state`: built on the meta device
    (no memory, no random init), given real storage on `device`, then filled with the weights cast to dtype."""
    with torch.device("meta"):
        model = kind(config)
    converted = convert_state_dict(state, model, source, prefix)
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True)
    return model.to(dtype)


def load_diffusers_folder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          ) -> tuple[UNet, VAE, TextEncoder, float | None]:
    """(U-Net, VAE, text encoder, the VAE's scaling_factor or None) from a diffusers folder with unet/, vae/
    and text_encoder/, each holding a config.json and its weights."""
    path = Path(path)

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

    unet = load_network(UNet, unet_config_from_diffusers(config("unet")), weights("unet", DIFFUSERS_WEIGHTS),
                        "diffusers", "", device, dtype)
    vae_json = config("vae")
    vae = load_network(VAE, vae_config_from_diffusers(vae_json), weights("vae", DIFFUSERS_WEIGHTS),
                       "diffusers", "", device, dtype)
    text = load_network(TextEncoder, text_config_from_transformers(config("text_encoder")),
                        weights("text_encoder", TRANSFORMERS_WEIGHTS), "diffusers", "", device, dtype)
    return unet, vae, text, vae_json.get("scaling_factor")


def load_original_file(path: str | Path, unet: UNetConfig, vae: VAEConfig, text: TextEncoderConfig,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       ) -> tuple[UNet, VAE, TextEncoder]:
    """(U-Net, VAE, text encoder) of the given configs from one original single-file checkpoint."""
    state = read_state_dict(path)
    parts = [(UNet, unet, ORIGINAL_PREFIXES["unet"]), (VAE, vae, ORIGINAL_PREFIXES["vae"]),
             (TextEncoder, text, ORIGINAL_PREFIXES["text"])]
    return tuple(load_network(kind, cfg, {k: v for k, v in state.items() if k.startswith(prefix)}, "original",
                              prefix, device, dtype) for kind, cfg, prefix in parts)


__all__ = ["SOURCES", "ORIGINAL_PREFIXES", "CheckpointMismatch", "unet_config_from_diffusers",
           "vae_config_from_diffusers", "text_config_from_transformers", "key_map", "convert_state_dict",
           "load_weights", "read_state_dict", "load_network", "load_diffusers_folder", "load_original_file"]
