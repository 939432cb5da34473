"""Stable Diffusion pipelines with random weights, for tests and benchmarks.

Nothing here touches the network: tokenizers are built from ShapesWorld's vocabulary
(:mod:`diffusion_xai.shapesworld.vocab`), models from configs. Every builder is seeded, so two
builds with the same seed hold identical weights; the global torch RNG is left as it was.

Two families:

* :func:`tiny_pipeline` -- very small SD 1.x / SD 2.x (v-prediction) / SDXL pipelines (well under a
  million parameters each) that run end to end in well under a second at 32x48 pixels on a CPU.
* ``architecture_*`` -- the real published architectures (configs in ``diffusion_xai/architectures``)
  with random weights. ``meta=True`` builds them on the ``meta`` device (no memory, ~0.1-0.5 s) for
  parameter counting and module inspection; otherwise the weights are materialised on the CPU with a
  fast seeded init (normal(0, 0.02) weights, zero biases, unit norm weights), which costs
  ``4 bytes x parameters`` in float32 and roughly 7-15 ns per parameter on one CPU core
  (measured: the sd15 pipeline in 15-20 s, 4.6 GB peak; sdxl in bfloat16 in 54 s, 7.2 GB peak).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .shapesworld.vocab import write_tokenizer_files

if TYPE_CHECKING:  # heavy imports stay lazy
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"

#: Words (beyond ShapesWorld's) that the test tokenizer holds as single tokens.
TEST_WORDS: tuple[str, ...] = (
    "a", "an", "the", "photo", "picture", "painting", "of", "dog", "cat", "man", "woman", "person",
    "doctor", "nurse", "cute", "tall", "house", "tree", "car", "sky", "red", "blue", "green",
)

#: SD's training noise schedule (shared by SD 1.x, 2.x and SDXL).
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
}

#: Published networks of each pipeline: (unet config, text encoder config(s), VAE scaling factor, prediction).
PIPELINES: dict[str, dict[str, Any]] = {
    "sd15": {"unet": "sd15_unet", "text": ("clip_vit_l14_text",), "vae_scale": 0.18215,
             "prediction_type": "epsilon"},
    "sd21": {"unet": "sd21_unet", "text": ("openclip_vit_h14_text",), "vae_scale": 0.18215,
             "prediction_type": "v_prediction"},
    "sdxl": {"unet": "sdxl_unet", "text": ("clip_vit_l14_text", "openclip_vit_bigg14_text"),
             "vae_scale": 0.13025, "prediction_type": "epsilon"},
}

#: Text encoders with a projection head (``CLIPTextModelWithProjection``).
_PROJECTED_TEXT = {"openclip_vit_bigg14_text"}
_TEXT_ALIASES = {"sd15": "clip_vit_l14_text", "sd21": "openclip_vit_h14_text", "sdxl": "clip_vit_l14_text",
                 "sdxl_2": "openclip_vit_bigg14_text"}


# --------------------------------------------------------------------------------------------- utilities


def count_parameters(module: nn.Module) -> int:
    """Number of (distinct) parameters of ``module``; works on ``meta`` modules too."""
    return sum(p.numel() for p in module.parameters())


def load_architecture(name: str) -> dict[str, Any]:
    """The config dict of ``diffusion_xai/architectures/<name>.json`` (private ``_keys`` dropped)."""
    path = ARCHITECTURES_DIR / f"{name.removesuffix('.json')}.json"
    if not path.exists():
        known = sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))
        raise ValueError(f"unknown architecture {name!r}; known: {known}")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the block, then restore the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on ``meta`` but buffers (e.g. CLIP's ``position_ids``) for real, on the CPU.

    Same trick as ``accelerate.init_empty_weights(include_buffers=False)``: every registered parameter
    is moved to ``meta`` at once, so the constructors' own (slow) initialisers touch no memory.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _materialize(model: nn.Module, seed: int, dtype: torch.dtype, std: float = 0.02) -> nn.Module:
    """Give every ``meta`` parameter of ``model`` CPU storage with a fast, seeded initialisation.

    Biases are zero, weights of normalisation layers one, every other parameter normal(0, ``std``),
    drawn in ``model.modules()`` order from one generator seeded with ``seed``. About 7-15 ns per
    parameter on one core (first-touch page faults included). Shared parameters stay shared.
    """
    gen = torch.Generator().manual_seed(seed)
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                t = torch.empty(p.shape, dtype=dtype)
                if name == "bias":
                    t.zero_()
                elif is_norm:
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, std, generator=gen)
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return model.eval()


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a freshly built model's floating tensors to ``dtype`` (a no-op when already so).

    Uses ``nn.Module.to`` directly: diffusers' override warns on every dtype cast (fresh models hold
    nothing that must stay float32).
    """
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    return nn.Module.to(model, dtype)


def _build(factory: Any, meta: bool, seed: int, dtype: torch.dtype) -> Any:
    """Call ``factory()`` on ``meta`` (``meta=True``) or build it empty and :func:`_materialize` it."""
    if meta:
        with torch.device("meta"):
            return _cast(factory(), dtype).eval()
    with _parameters_on_meta():
        model = factory()
    return _materialize(model, seed, dtype)


# --------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer(folder: str | Path | None = None, pad_token: str | None = None,
                   extra_words: Iterable[str] = ()) -> CLIPTokenizer:
    """A small real ``CLIPTokenizer`` (ShapesWorld words + :data:`TEST_WORDS` + ``extra_words``).

    Any text tokenises (unknown words fall apart into byte symbols); the listed words are one token
    each. Ids stay below ``len(tokenizer)`` (a few hundred), so it also drives text encoders with
    CLIP's 49,408-token vocabulary. BOS/EOS are the two highest ids, as in CLIP.

    Args:
        folder: where the files go; a fresh temporary directory by default.
        pad_token: a different padding token, e.g. ``"!"`` for SDXL's ``tokenizer_2`` (the default pads
            with EOS, like SD's first tokenizer).
        extra_words: more words to make single tokens.
    """
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="diffusion_xai_tok_") if folder is None else folder)
    write_tokenizer_files(folder, extra_words=sorted(set(TEST_WORDS) | set(extra_words)))
    if pad_token is not None:
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg = json.loads((folder / fname).read_text())
            cfg["pad_token"] = pad_token
            (folder / fname).write_text(json.dumps(cfg))
    return CLIPTokenizer.from_pretrained(str(folder))


def _scheduler(kind: str, prediction_type: str) -> Any:
    """DDIM (SD 1.x/2.x) or Euler (SDXL) with SD's noise schedule and step spacing."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if kind == "sdxl":
        return EulerDiscreteScheduler(**SCHEDULE, prediction_type=prediction_type, steps_offset=1,
                                      timestep_spacing="leading")
    return DDIMScheduler(**SCHEDULE, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# --------------------------------------------------------------------------------------------- tiny pipelines

TINY_KINDS = ("sd1", "sd2v", "sdxl")


def _tiny_text_config(tok: CLIPTokenizer, hidden: int, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=projection_dim, hidden_act="quick_gelu",
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def tiny_pipeline(kind: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A very small Stable Diffusion pipeline with random (default-initialised, seeded) weights.

    Kinds:

    * ``"sd1"``: ``StableDiffusionPipeline``, epsilon prediction, DDIM.
    * ``"sd2v"``: the same with v-prediction and SD 2's UNet options (per-block ``attention_head_dim``
      list, linear projections in the transformers, upcast attention).
    * ``"sdxl"``: ``StableDiffusionXLPipeline`` with two text encoders (the second with projection,
      its tokenizer padding with ``"!"``), ``text_time`` added conditioning, two transformer layers in
      the second block, Euler scheduler.

    All have a UNet with blocks (32, 64), one layer per block, cross-attention at both resolutions,
    a VAE with two blocks (latents are half the image size), and 2-layer, width-32 CLIP text encoders.
    Any height/width divisible by 8 works, e.g. ``pipe("a red circle", num_inference_steps=2,
    height=32, width=48, output_type="np")`` (< 1 s on a CPU). Building takes ~0.1 s plus the
    tokenizer(s); same ``seed`` -> identical weights.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    sdxl = kind == "sdxl"
    tok = make_tokenizer()
    unet_cfg: dict[str, Any] = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )
    if kind == "sd2v":
        unet_cfg.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    projection_dim, time_dim = 32, 8
    if sdxl:
        unet_cfg.update(attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32 + 32,
                        transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                        addition_time_embed_dim=time_dim,
                        projection_class_embeddings_input_dim=projection_dim + 6 * time_dim)
    vae_cfg: dict[str, Any] = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32, scaling_factor=0.13025 if sdxl else 0.18215,
    )
    with _seeded(seed):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(_tiny_text_config(tok, 32, projection_dim))
        parts: dict[str, Any] = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok)
        if sdxl:
            tok2 = make_tokenizer(pad_token="!")
            parts.update(text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(tok2, 32, projection_dim)),
                         tokenizer_2=tok2)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name] = _cast(parts[name], dtype).eval()
    scheduler = _scheduler(kind, "v_prediction" if kind == "sd2v" else "epsilon")
    if sdxl:
        return StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    return StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --------------------------------------------------------------------------------------------- real architectures


def architecture_unet(name: str, *, meta: bool = False, dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> UNet2DConditionModel:
    """The published UNet of ``name`` in {"sd15", "sd21", "sdxl"} with random weights.

    Parameters: sd15 859,520,964; sd21 865,910,724; sdxl 2,567,463,684. ``meta=True``: no memory,
    ~0.2 s (sdxl ~0.4 s). Otherwise float32 takes 3.4 / 3.5 / 10.3 GB (half that in bfloat16) and
    ~7-13 s / ~7-13 s / ~20-40 s on one CPU core.
    """
    from diffusers import UNet2DConditionModel

    cfg = load_architecture(_pipeline_spec(name)["unet"])
    return _build(lambda: UNet2DConditionModel(**cfg), meta, seed, dtype)


def architecture_text_encoder(name: str, *, meta: bool = False, dtype: torch.dtype = torch.float32,
                              seed: int = 0) -> CLIPTextModel:
    """A published CLIP text encoder with random weights.

    ``name``: a config (``"clip_vit_l14_text"`` 123,060,480 parameters, ``"openclip_vit_h14_text"``
    340,387,840, ``"openclip_vit_bigg14_text"`` 694,659,840 -- the latter a
    ``CLIPTextModelWithProjection``) or a pipeline's encoder: ``"sd15"``, ``"sd21"``, ``"sdxl"`` (its
    first encoder) or ``"sdxl_2"`` (its second). Float32 memory: 0.5 / 1.4 / 2.8 GB.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg_name = _TEXT_ALIASES.get(name, name).removesuffix(".json")
    config = CLIPTextConfig(**load_architecture(cfg_name))
    cls = CLIPTextModelWithProjection if cfg_name in _PROJECTED_TEXT else CLIPTextModel
    return _build(lambda: cls(config), meta, seed, dtype)


def architecture_vae(name: str = "sd", *, meta: bool = False, dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> AutoencoderKL:
    """SD's published VAE (83,653,863 parameters, 0.33 GB in float32) with random weights.

    ``name``: ``"sd"`` (also ``"sd15"``, ``"sd21"``; scaling factor 0.18215) or ``"sdxl"`` (same
    architecture, scaling factor 0.13025).
    """
    from diffusers import AutoencoderKL

    if name not in ("sd", "sd15", "sd21", "sdxl"):
        raise ValueError(f"unknown VAE {name!r}; use 'sd' or 'sdxl'")
    cfg = load_architecture("sd_vae")
    if name == "sdxl":
        cfg["scaling_factor"] = PIPELINES["sdxl"]["vae_scale"]
    return _build(lambda: AutoencoderKL(**cfg), meta, seed, dtype)


def _pipeline_spec(name: str) -> dict[str, Any]:
    if name not in PIPELINES:
        raise ValueError(f"name must be one of {sorted(PIPELINES)}, got {name!r}")
    return PIPELINES[name]


def architecture_pipeline(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                          meta: bool = False) -> DiffusionPipeline:
    """The full published pipeline ``name`` in {"sd15", "sd21", "sdxl"} with random weights.

    sd15: ``StableDiffusionPipeline`` (CLIP ViT-L/14, epsilon); sd21: the 768-v model (OpenCLIP
    ViT-H/14, v-prediction); sdxl: ``StableDiffusionXLPipeline`` (CLIP ViT-L/14 + OpenCLIP bigG/14 with
    projection, VAE scaling 0.13025, Euler). Tokenizers come from :func:`make_tokenizer` (ids stay
    small; EOS is the highest id, which CLIP's legacy ``eos_token_id=2`` pooling relies on).

    Components are seeded ``seed``, ``seed + 1``, ... Float32 memory: sd15 ~4.3 GB (1.07 B parameters),
    sd21 ~5.2 GB (1.29 B), sdxl ~13.9 GB (3.47 B); bfloat16 halves it. Time is dominated by the
    initialisation, ~7-15 ns per parameter on one core (measured on a busy 2-core machine:
    sd15 float32 15-20 s, 4.6 GB peak RSS; sdxl bfloat16 54 s, 7.2 GB). ``meta=True`` costs nothing and
    gives a pipeline for counting and inspection only.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    spec = _pipeline_spec(name)
    opts: dict[str, Any] = dict(meta=meta, dtype=dtype)
    parts: dict[str, Any] = dict(
        unet=architecture_unet(name, seed=seed, **opts),
        vae=architecture_vae(name, seed=seed + 1, **opts),
        text_encoder=architecture_text_encoder(spec["text"][0], seed=seed + 2, **opts),
        tokenizer=make_tokenizer(),
        scheduler=_scheduler(name, spec["prediction_type"]),
    )
    if name == "sdxl":
        parts.update(text_encoder_2=architecture_text_encoder(spec["text"][1], seed=seed + 3, **opts),
                     tokenizer_2=make_tokenizer(pad_token="!"))
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
