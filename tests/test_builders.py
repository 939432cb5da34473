"""Known-answer tests of the random-weight pipeline builders in :mod:`diffusion_xai.testing`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_xai import testing
from diffusion_xai.testing import (
    architecture_pipeline,
    architecture_text_encoder,
    architecture_unet,
    architecture_vae,
    count_parameters,
    make_tokenizer,
    tiny_pipeline,
)

# Parameter counts of the published checkpoints.
UNET_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
TEXT_PARAMS = {"clip_vit_l14_text": 123_060_480, "openclip_vit_h14_text": 340_387_840,
               "openclip_vit_bigg14_text": 694_659_840}
VAE_PARAMS = 83_653_863
ATTN2_LAYERS = {"sd15": 16, "sd21": 16, "sdxl": 70}


def _modules(pipe) -> dict[str, nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}


def _generate(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# --------------------------------------------------------------------------------------------- real architectures


@pytest.mark.parametrize("name", sorted(UNET_PARAMS))
def test_unet_parameter_count(name: str) -> None:
    unet = architecture_unet(name, meta=True)
    assert unet.device.type == "meta"
    assert count_parameters(unet) == UNET_PARAMS[name]


@pytest.mark.parametrize("name", sorted(ATTN2_LAYERS))
def test_unet_cross_attention_layers(name: str) -> None:
    unet = architecture_unet(name, meta=True)
    assert sum(1 for n, _ in unet.named_modules() if n.endswith("attn2")) == ATTN2_LAYERS[name]


@pytest.mark.parametrize("name", sorted(TEXT_PARAMS))
def test_text_encoder_parameter_count(name: str) -> None:
    assert count_parameters(architecture_text_encoder(name, meta=True)) == TEXT_PARAMS[name]


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_vae_parameter_count(name: str) -> None:
    vae = architecture_vae(name, meta=True)
    assert count_parameters(vae) == VAE_PARAMS
    assert vae.config.scaling_factor == (0.13025 if name == "sdxl" else 0.18215)


def test_architecture_pipelines_on_meta() -> None:
    sd15, sd21, sdxl = (architecture_pipeline(n, meta=True) for n in ("sd15", "sd21", "sdxl"))
    assert type(sd15).__name__ == "StableDiffusionPipeline"
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert sd15.scheduler.config.prediction_type == "epsilon"
    assert sd21.scheduler.config.prediction_type == "v_prediction"
    assert sd21.unet.config.cross_attention_dim == sd21.text_encoder.config.hidden_size == 1024
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.vae.config.scaling_factor == 0.13025
    assert sdxl.tokenizer_2.pad_token == "!"
    totals = {n: sum(map(count_parameters, _modules(p).values())) for n, p in
              (("sd15", sd15), ("sd21", sd21), ("sdxl", sdxl))}
    assert totals == {
        "sd15": UNET_PARAMS["sd15"] + VAE_PARAMS + TEXT_PARAMS["clip_vit_l14_text"],
        "sd21": UNET_PARAMS["sd21"] + VAE_PARAMS + TEXT_PARAMS["openclip_vit_h14_text"],
        "sdxl": UNET_PARAMS["sdxl"] + VAE_PARAMS + TEXT_PARAMS["clip_vit_l14_text"]
        + TEXT_PARAMS["openclip_vit_bigg14_text"],
    }


def test_fast_init_is_seeded_and_structured() -> None:
    """The real VAE (84 M parameters, ~1-2 s): same seed, same weights; biases 0, norms 1, weights ~N(0, 0.02)."""
    a, b = architecture_vae(seed=3), architecture_vae(seed=3)
    assert count_parameters(a) == VAE_PARAMS
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.device.type == "cpu" and p.dtype == torch.float32
        assert torch.equal(p, q), name
    conv = a.encoder.conv_in
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.all(a.encoder.conv_norm_out.weight == 1)
    assert abs(conv.weight.std().item() - 0.02) < 0.002
    c = architecture_vae(seed=4)
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)


def test_fast_init_keeps_buffers() -> None:
    """Materialised models keep their real buffers (CLIP's position ids); bfloat16 is honoured."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77)
    model = testing._build(lambda: CLIPTextModel(config), meta=False, seed=0, dtype=torch.bfloat16)
    (ids,) = [b for n, b in model.named_buffers() if n.endswith("position_ids")]
    assert torch.equal(ids, torch.arange(77)[None])
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer() -> None:
    tok = make_tokenizer()
    ids = tok("a photo of a cute dog").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 6  # each word one token
    assert tok.eos_token_id == len(tok) - 1  # EOS is the highest id, as CLIP's legacy pooling assumes
    assert tok.pad_token == tok.eos_token
    assert len(tok("zyxwvut qq").input_ids) > 3  # unknown words still tokenise
    tok2 = make_tokenizer(pad_token="!")
    assert tok2.pad_token == "!" and tok2.pad_token_id == tok2.convert_tokens_to_ids("!")
    padded = tok2("a dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok2.pad_token_id != tok2.eos_token_id


# --------------------------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("kind", testing.TINY_KINDS)
def test_tiny_pipeline_is_seeded(kind: str) -> None:
    a, b, c = tiny_pipeline(kind, seed=0), tiny_pipeline(kind, seed=0), tiny_pipeline(kind, seed=1)
    for name, module in _modules(a).items():
        sa, sb = module.state_dict(), _modules(b)[name].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


@pytest.mark.parametrize("kind", testing.TINY_KINDS)
def test_tiny_pipeline_generates_non_square(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    assert count_parameters(pipe.unet) < 2_000_000
    image = _generate(pipe)
    assert image.shape == (1, 32, 48, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    np.testing.assert_array_equal(image, _generate(pipe))  # seeded generator: reproducible


def test_tiny_pipeline_kinds() -> None:
    sd1, sd2v, sdxl = (tiny_pipeline(k) for k in testing.TINY_KINDS)
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert sd2v.scheduler.config.prediction_type == "v_prediction"
    assert sd2v.unet.config.use_linear_projection and isinstance(sd2v.unet.config.attention_head_dim, (list, tuple))
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == (sdxl.text_encoder.config.hidden_size
                                                    + sdxl.text_encoder_2.config.hidden_size)
    assert sdxl.tokenizer_2.pad_token == "!"
    assert sdxl.vae.config.scaling_factor == 0.13025
    attn2 = {k: sum(1 for n, _ in p.unet.named_modules() if n.endswith("attn2")) for k, p in
             (("sd1", sd1), ("sdxl", sdxl))}
    # down (1 resnet/block) + mid + up (2 resnets/block); sdxl: transformer depth (1, 2), mid 2, up (2, 1)
    assert attn2 == {"sd1": 2 + 1 + 4, "sdxl": (1 + 2) + 2 + (2 * 2 + 2 * 1)}


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_tiny_pipeline_dtype(dtype: torch.dtype) -> None:
    pipe = tiny_pipeline("sd1", dtype=dtype)
    assert {p.dtype for m in _modules(pipe).values() for p in m.parameters()} == {dtype}
