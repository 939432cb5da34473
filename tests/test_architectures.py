"""Real SD 1.5 / SD 2.1 / SDXL architectures (published configs, random weights) at small resolution."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from diffusion_xai import AttentionRecorder, XAIPipeline
from diffusion_xai.testing import architecture_pipeline

# float32 throughout: CPU bfloat16 matmuls are ~10x slower here (SDXL fp32 peaks at ~14 GB); dtypes are
# covered on the tiny pipelines.
CASES = [("sd15", torch.float32, 16), ("sd21", torch.float32, 16), ("sdxl", torch.float32, 70)]


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype,n_cross", CASES)
def test_real_architecture_hooks_and_predict_noise(name, dtype, n_cross):
    pipe = architecture_pipeline(name, dtype=dtype)
    try:
        xp = XAIPipeline(pipe, batch_size=2)
        assert xp.is_sdxl == (name == "sdxl")
        assert xp.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
        before = dict(pipe.unet.attn_processors)
        # every cross-attention layer is seen during a 1-step generation (64x48 px: non-square)
        rec = AttentionRecorder()
        with xp.hooks(rec):
            out = xp.generate("a red circle", seed=0, num_inference_steps=1, height=64, width=48,
                              output_type="latent", progress=False)
        assert out.images.shape == (1, 4, 8, 6)
        assert len(rec.layers) == n_cross
        assert all(rec.sums[n].shape[0] == 1 and rec.sums[n].shape[-1] == 77 for n in rec.layers)
        for n in rec.layers:  # every layer's grid is the (non-square) latent grid at its downsampling factor
            f = rec.factor_of[n]
            assert rec.sums[n].shape[2:4] == (math.ceil(8 / f), math.ceil(6 / f)), n
        assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())

        # predict_noise equals a direct UNet call
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
        t = torch.tensor([100, 700])
        emb = xp.encode_prompt(["a red circle", "a blue square"])
        eps = xp.predict_noise(x, t, emb)
        kw = {}
        if name == "sdxl":
            ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=dtype).expand(2, 6)
            kw["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": ids}
        with torch.no_grad():
            raw = pipe.unet(x, t, encoder_hidden_states=emb.embeds, **kw).sample
        if name == "sd21":
            a = xp.alphas_cumprod[t].view(-1, 1, 1, 1).to(raw.dtype)
            raw = (1 - a).sqrt() * x + a.sqrt() * raw
        assert eps.dtype == dtype
        assert torch.allclose(eps.float(), raw.float(), atol=1e-5, rtol=0)
    finally:
        del pipe
        gc.collect()
