"""XAIPipeline, hooks and heatmaps on tiny random SD 1.x, SD 2 (v-prediction) and SDXL pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_xai import (
    ActivationPatcher,
    ActivationRecorder,
    AttentionEditor,
    AttentionRecorder,
    HeatmapResult,
    HookManager,
    XAIPipeline,
)

KINDS = ["sd1", "sd2v", "sdxl"]


def _xp(tiny, kind):
    return XAIPipeline(tiny(kind), default_steps=2)


def _gen(xp, prompt="a red circle", seed=3, **kw):
    return xp.generate(prompt, seed=seed, output_type="np", progress=False, height=32, width=48, **kw).images


@pytest.mark.parametrize("kind", KINDS)
def test_heatmaps_every_word_non_square(tiny, kind):
    xp = _xp(tiny, kind)
    prompt = "a red circle, and a giraffe"
    res = xp.heatmaps(prompt, seed=1, height=32, width=48, progress=False)
    f = xp.vae_scale_factor
    assert res.token_maps.shape == (1, 77, 32 // f, 48 // f)
    assert res.images[0].size == (48, 32)
    n_cross = sum(1 for k in xp.unet.attn_processors if k.endswith("attn2.processor"))
    assert len(res.layers) == n_cross
    for w in ["a", "red", "circle", ",", "and", "giraffe"]:
        m = res.word_map(w)
        assert m.shape == (32 // f, 48 // f) and (m >= 0).all() and m.sum() > 0
    # a multi-token word's map is the mean of its tokens' maps ("giraffe" splits into pieces in the test vocabulary)
    from diffusion_xai.tokens import find_word
    pos = find_word(xp.pipe.tokenizer, prompt, "giraffe")
    assert len(pos) > 1
    assert torch.allclose(res.word_map("giraffe"), res.token_maps[0, pos].mean(0))
    assert torch.allclose(res.word_map("a"), res.token_maps[0, find_word(xp.pipe.tokenizer, prompt, "a")].mean(0))
    assert res.overlay("red").size == (48, 32)
    mask = res.mask("circle")
    assert mask.dtype == torch.bool and mask.any() and not mask.all()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_prompts_and_images_gives_distinct_maps(tiny, kind):
    xp = _xp(tiny, kind)
    res = xp.heatmaps(["a red circle", "a blue dog"], seed=0, num_images_per_prompt=2, height=32, width=32,
                      progress=False)
    assert res.token_maps.shape[0] == 4 and len(res.images) == 4
    assert res.prompts == ["a red circle", "a red circle", "a blue dog", "a blue dog"]
    maps = [res.word_map("a", i) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(maps[i], maps[j])
    with pytest.raises(ValueError, match="'circle' is not in prompt 'a blue dog'"):
        res.word_map("circle", image=2)


@pytest.mark.parametrize("kind", KINDS)
def test_recording_changes_no_output_and_restores_exactly(tiny, kind):
    xp = _xp(tiny, kind)
    before = dict(xp.unet.attn_processors)
    ref = _gen(xp)
    rec = AttentionRecorder(self_attention=True)
    with xp.hooks(rec):
        hooked = _gen(xp)
        assert all(xp.unet.attn_processors[k] is not v for k, v in before.items())
    assert np.array_equal(ref, hooked), "recording must not change the output"
    assert len(rec.layers) == len(before)
    assert all(xp.unet.attn_processors[k] is v for k, v in before.items())
    assert np.array_equal(ref, _gen(xp))


def test_restores_after_an_exception(tiny):
    xp = _xp(tiny, "sd1")
    before = dict(xp.unet.attn_processors)
    ref = _gen(xp)
    n_hooks = len(xp.unet._forward_pre_hooks)

    def boom(layer, out, ctx):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-generation

    with pytest.raises(KeyboardInterrupt):
        with xp.hooks(AttentionEditor(boom, kind="output"), ActivationRecorder(["mid_block"])):
            _gen(xp)
    assert all(xp.unet.attn_processors[k] is v for k, v in before.items())
    assert len(xp.unet._forward_pre_hooks) == n_hooks
    assert not xp.unet.mid_block._forward_hooks
    assert np.array_equal(ref, _gen(xp))


def test_probabilities_are_softmax_and_memory_does_not_grow_with_steps(tiny):
    xp = _xp(tiny, "sd1")
    sizes = {}
    for steps in (2, 5):
        rec = AttentionRecorder()
        with xp.hooks(rec):
            _gen(xp, num_inference_steps=steps)
        heads = {n: xp.unet.get_submodule(n).heads for n in rec.layers}
        for n, s in rec.sums.items():
            # each step adds probabilities summing to 1 over keys, for every head
            assert rec.counts[n] == steps
            assert torch.allclose(s.sum(-1), torch.full_like(s.sum(-1), steps * heads[n]), atol=1e-4)
        sizes[steps] = rec.state_bytes()
    assert sizes[2] == sizes[5]
    binned = AttentionRecorder(per_step=True)
    with xp.hooks(binned):
        _gen(xp, num_inference_steps=3)
    for n in binned.layers:
        assert sorted(binned.steps[n]) == [0, 1, 2]
        assert torch.allclose(sum(binned.steps[n].values()), binned.sums[n], atol=1e-6)


def test_recorder_reads_the_conditional_half_of_cfg(tiny):
    """Step 0 of a CFG generation equals a direct predict_noise call on the conditional prompt."""
    xp = _xp(tiny, "sd1")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    rec = AttentionRecorder(per_step=True)
    with xp.hooks(rec):
        xp.generate("a red circle", seed=0, latents=latents, guidance_scale=5.0, progress=False,
                    height=32, width=32, output_type="latent")
    t0 = xp.pipe.scheduler.timesteps[0]
    direct = AttentionRecorder(per_step=True)
    with xp.hooks(direct):
        xp.predict_noise(latents * xp.pipe.scheduler.init_noise_sigma, t0, xp.encode_prompt("a red circle"))
    uncond = AttentionRecorder(per_step=True)
    with xp.hooks(uncond):
        xp.predict_noise(latents * xp.pipe.scheduler.init_noise_sigma, t0, xp.encode_prompt(""))
    for n in rec.layers:
        assert torch.allclose(rec.steps[n][0], direct.steps[n][0], atol=1e-5)
        assert not torch.allclose(rec.steps[n][0], uncond.steps[n][0], atol=1e-3)


def test_filters_select_layers_heads_and_timesteps(tiny):
    xp = _xp(tiny, "sd1")
    rec = AttentionRecorder(blocks=["up"], factors=[2], heads=[0], keep_heads=True, timesteps=(0, 600))
    with xp.hooks(rec):
        _gen(xp, num_inference_steps=4)
    assert rec.layers and all(n.startswith("up_blocks.0") for n in rec.layers)
    assert all(s.shape[1] == 1 for s in rec.sums.values())
    ts = [float(t) for t in xp.pipe.scheduler.timesteps]
    assert all(c == sum(t <= 600 for t in ts) for c in rec.counts.values())
    with pytest.raises(ValueError, match="allowed: down, mid, up"):
        AttentionRecorder(blocks=["middle"])
    with pytest.raises(ValueError, match=r"factor\(s\) \[8\]"):
        with xp.hooks(AttentionRecorder(factors=[8])):
            pass
    with pytest.raises(ValueError, match="matches no attention layer"):
        with xp.hooks(AttentionRecorder(layers=["down_blocks.9.attn2"])):
            pass


def test_attention_editor(tiny):
    xp = _xp(tiny, "sd1")
    ref = _gen(xp)
    with xp.hooks(AttentionEditor(lambda layer, p, ctx: p)):
        same = _gen(xp)
    np.testing.assert_allclose(same, ref, atol=2e-5)  # explicit attention vs SDPA: float tolerance

    def drop_token(layer, p, ctx):
        p = p.clone()
        p[..., 2] = 0  # no attention to "red"
        return p / p.sum(-1, keepdim=True)
    with xp.hooks(AttentionEditor(drop_token)):
        edited = _gen(xp)
    assert np.abs(edited - ref).max() > 1e-3
    with xp.hooks(AttentionEditor(lambda layer, out, ctx: out, kind="output")):
        assert np.array_equal(_gen(xp), ref)
    with pytest.raises(ValueError, match="kind must be"):
        AttentionEditor(lambda *a: a[1], kind="values")


def test_activation_recorder_and_patcher(tiny):
    xp = _xp(tiny, "sd1")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = xp.encode_prompt("a red circle")
    rec = ActivationRecorder(["mid_block", "down_blocks.0.resnets.0"])
    with xp.hooks(rec):
        ref = xp.predict_noise(x, 500, emb)
    assert len(rec.records["mid_block"]) == 1 and rec.records["mid_block"][0].shape[0] == 2
    recorded = rec.records["mid_block"][0]
    with xp.hooks(ActivationPatcher({"mid_block": recorded})):
        assert torch.equal(xp.predict_noise(x, 500, emb), ref)
    with xp.hooks(ActivationPatcher({"mid_block": lambda out, ctx: torch.zeros_like(out)})):
        assert not torch.allclose(xp.predict_noise(x, 500, emb), ref)
    with pytest.raises(ValueError, match="'mid_blok' is not in this UNet; closest: mid_block"):
        with xp.hooks(ActivationRecorder(["mid_blok"])):
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_predict_noise_matches_unet_and_converts_v(tiny, kind):
    xp = XAIPipeline(tiny(kind), batch_size=3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 12, generator=g)
    noise = torch.randn(5, 4, 8, 12, generator=g)
    t = torch.tensor([10, 200, 400, 600, 999])
    xt = xp.add_noise(x0, noise, t)
    a = xp.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    emb = xp.encode_prompt(["a red circle"] * 5)
    evals = xp.unet_evals
    eps = xp.predict_noise(xt, t, emb)
    assert xp.unet_evals - evals == 5
    kw = {}
    if kind == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": emb.pooled,
                                   "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24]]).expand(5, 6)}
    with torch.no_grad():
        raw = xp.unet(xt, t, encoder_hidden_states=emb.embeds, **kw).sample
    if kind == "sd2v":
        raw = (1 - a).sqrt() * xt + a.sqrt() * raw  # eps from v
    assert torch.allclose(eps, raw, atol=1e-5)


def test_logsnr_roundtrip_and_cache(tiny):
    xp = _xp(tiny, "sd1")
    t = torch.arange(0, 1000, 37)
    assert torch.equal(xp.logsnr_to_t(xp.t_to_logsnr(t)), t)
    a = xp.t_to_logsnr(torch.arange(1000))
    assert (a[1:] < a[:-1]).all()  # logSNR falls with t
    e1 = xp.encode_prompt("a red circle")
    assert xp.encode_prompt("a red circle").embeds is e1.embeds or torch.equal(xp.encode_prompt("a red circle").embeds,
                                                                                e1.embeds)
    both = xp.encode_prompt(["", "a red circle"])
    assert torch.equal(both.embeds[1], e1.embeds[0]) and not torch.equal(both.embeds[0], both.embeds[1])
    assert both.embeds[0].abs().sum() > 0  # "" is the encoded empty prompt, not zeros


def test_encode_image_roundtrip_and_errors(tiny):
    xp = _xp(tiny, "sd1")
    img = Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    lat = xp.encode_image(img)
    assert lat.shape == (1, 4, 16, 24)
    assert torch.allclose(xp.encode_image(np.zeros((2, 32, 48, 3), np.uint8)), lat.expand(2, -1, -1, -1), atol=1e-3)
    with pytest.raises(ValueError, match="image mode 'L' is not supported; allowed: 'RGB'"):
        xp.encode_image(img.convert("L"))
    with pytest.raises(ValueError, match="image size 33x30 is not allowed; width and height must be multiples of 2"):
        xp.encode_image(Image.new("RGB", (33, 30)))


def test_bad_input_errors(tiny):
    xp = _xp(tiny, "sd1")
    with pytest.raises(ValueError, match="word 'dog' is not in prompt 'a red circle'; words: a, red, circle"):
        xp.heatmaps("a red circle", words=["dog"], progress=False)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        xp.generate("  ", progress=False)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        xp.generate("a red circle", seed=-1, progress=False)
    with pytest.raises(TypeError, match="unsupported pipeline DDPMPipeline; supported: StableDiffusionPipeline"):
        from diffusers import DDPMPipeline, DDPMScheduler
        XAIPipeline(DDPMPipeline(unet=xp.unet, scheduler=DDPMScheduler()))
    with pytest.raises(ValueError, match="height 31 is not allowed"):
        xp.generate("a red circle", height=31, progress=False)
    with pytest.raises(ValueError, match="timesteps must be in"):
        xp.predict_noise(torch.zeros(1, 4, 8, 8), 1000, xp.encode_prompt("a"))


def test_heatmap_result_save_load(tiny, tmp_path):
    xp = _xp(tiny, "sd1")
    res = xp.heatmaps("a red circle", seed=2, height=32, width=32, progress=False)
    res.save(tmp_path / "r")
    back = HeatmapResult.load(tmp_path / "r")
    assert torch.equal(back.token_maps, res.token_maps)
    assert torch.equal(back.word_map("circle"), res.word_map("circle"))
    assert np.array_equal(np.asarray(back.images[0]), np.asarray(res.images[0]))
    assert back.to_dict()["seed"] == 2
    with pytest.raises(FileNotFoundError):
        HeatmapResult.load(tmp_path / "missing")


def test_hook_manager_directly_on_a_plain_pipeline(tiny):
    pipe = tiny("sd1")
    rec = AttentionRecorder()
    with HookManager(pipe.unet, [rec], num_images=1):
        pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0))
    assert all(c == 2 for c in rec.counts.values())
    assert all(s.shape[0] == 1 for s in rec.sums.values())


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_pipelines(kind):
    """bfloat16 weights: hooks, heatmaps and predict_noise keep the model's dtype."""
    from diffusion_xai.testing import tiny_pipeline

    xp = XAIPipeline(tiny_pipeline(kind, dtype=torch.bfloat16), default_steps=2)
    res = xp.heatmaps("a red circle", seed=0, height=32, width=32, progress=False)
    assert res.token_maps.dtype == torch.float32 and torch.isfinite(res.token_maps).all()
    eps = xp.predict_noise(torch.randn(2, 4, 16, 16, dtype=torch.bfloat16), 300, xp.encode_prompt("a red circle"))
    assert eps.dtype == torch.bfloat16 and torch.isfinite(eps).all()
