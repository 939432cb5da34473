"""Text-embedding tweaks (T2I-Zero CBS / cross-token NMS) and embedding-level prompt edits, on tiny pipelines."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from diffusion_xai import XAIPipeline
from diffusion_xai.tokens import find_word
from diffusion_xai.tweaks import (
    CorrectionBySimilarities,
    CrossTokenNMS,
    Interpolate,
    Remove,
    Reweight,
    Swap,
    correct_by_similarities,
    gaussian_kernel,
    generate_with_tweaks,
    nms_suppressed_mask,
    tweak_embeddings,
)
from diffusion_xai.tweaks_cli import parse_tweak, register

KINDS = ["sd1", "sd2v", "sdxl"]
PROMPT = "a red circle and a blue square"


def _xp(tiny, kind):
    return XAIPipeline(tiny(kind), default_steps=2)


KW = dict(seed=3, output_type="np", progress=False, height=32, width=32)


def _plain(xp, prompt=PROMPT, **kw):
    return xp.generate(prompt, **{**KW, **kw}).images


def _tweaked(xp, tweaks, prompt=PROMPT, **kw):
    return generate_with_tweaks(xp, prompt, tweaks, **{**KW, **kw}).images


# --------------------------------------------------------------------------------------------- identity / no trace


@pytest.mark.parametrize("kind", KINDS)
def test_neutral_tweaks_are_bit_identical_and_leave_no_trace(tiny, kind):
    xp = _xp(tiny, kind)
    before = dict(xp.unet.attn_processors)
    cached = xp.encode_prompt(PROMPT).embeds.clone()
    ref = _plain(xp, num_images_per_prompt=2)
    neutral = [CorrectionBySimilarities("circle", alpha=0), Reweight("red", 1.0), Remove("blue", alpha=0),
               Swap("square", "cross", alpha=0), Interpolate("and", "the", 0.0), CrossTokenNMS(alpha=0)]
    assert np.array_equal(ref, _tweaked(xp, neutral, num_images_per_prompt=2))
    # a real edit changes the image, and afterwards nothing is left behind
    changed = _tweaked(xp, [CorrectionBySimilarities(["circle", "square"], alpha=0.5), CrossTokenNMS(alpha=1.0)],
                       num_images_per_prompt=2)
    assert np.abs(changed - ref).max() > 1e-3
    assert dict(xp.unet.attn_processors) == before
    assert all(xp.unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(xp.encode_prompt(PROMPT).embeds, cached)
    assert np.array_equal(ref, _plain(xp, num_images_per_prompt=2))


@pytest.mark.parametrize("tweak", [CorrectionBySimilarities("circle", alpha=0), Reweight("red", 1.0),
                                   Remove("blue", alpha=0), Swap("square", "cross", alpha=0),
                                   Interpolate("red", "green", 0.0), CrossTokenNMS(["red", "circle"], alpha=0)],
                         ids=lambda t: type(t).__name__)
def test_each_tweak_neutral_alone_is_bit_identical(tiny, tweak):
    xp = _xp(tiny, "sd1")
    assert np.array_equal(_plain(xp), _tweaked(xp, [tweak]))


def test_processors_restored_after_an_exception(tiny):
    xp = _xp(tiny, "sd1")
    before = dict(xp.unet.attn_processors)

    def boom(pipe, step, t, kw):
        assert any(xp.unet.attn_processors[k] is not v for k, v in before.items())  # NMS is installed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tweaked(xp, [CrossTokenNMS(alpha=0.5)], callback_on_step_end=boom)
    assert all(xp.unet.attn_processors[k] is v for k, v in before.items())
    assert not xp._managers


# --------------------------------------------------------------------------------------------- embedding edits


@pytest.mark.parametrize("kind", KINDS)
def test_remove_equals_generation_with_empty_prompt_embeddings_at_the_word(tiny, kind):
    xp = _xp(tiny, kind)
    full, empty = xp.encode_prompt(PROMPT), xp.encode_prompt("")
    pos = find_word(xp.pipe.tokenizer, PROMPT, "red")
    manual = full.embeds.clone()
    manual[:, pos] = empty.embeds[:, pos]
    extra = {"pooled_prompt_embeds": full.pooled} if xp.is_sdxl else {}
    expected = xp.generate([], prompt_embeds=manual, **KW, **extra).images
    got = _tweaked(xp, [Remove("red")])
    assert np.array_equal(got, expected)
    assert np.abs(got - _plain(xp)).max() > 1e-4


def test_swap_interpolate_reweight_known_embeddings(tiny):
    xp = _xp(tiny, "sdxl")  # two encoders concatenated: the edits act on the whole width
    E = xp.encode_prompt(PROMPT).embeds[0]
    G = xp.encode_prompt("a green circle and a blue square").embeds[0]
    pos = find_word(xp.pipe.tokenizer, PROMPT, "red")
    others = [i for i in range(E.shape[0]) if i not in pos]
    sw = tweak_embeddings(xp, PROMPT, [Swap("red", "green")]).embeds[0]
    assert torch.equal(sw[pos], G[pos]) and torch.equal(sw[others], E[others])
    half = tweak_embeddings(xp, PROMPT, [Interpolate("red", "green", 0.5)]).embeds[0]
    assert torch.allclose(half[pos], (E[pos] + G[pos]) / 2, atol=1e-6) and torch.equal(half[others], E[others])
    assert torch.equal(tweak_embeddings(xp, PROMPT, [Interpolate("red", "green", 1.0)]).embeds, sw[None])
    rw = tweak_embeddings(xp, PROMPT, [Reweight("circle", 2.5)])
    c = find_word(xp.pipe.tokenizer, PROMPT, "circle")
    assert torch.allclose(rw.embeds[0, c], 2.5 * E[c]) and torch.equal(rw.pooled, xp.encode_prompt(PROMPT).pooled)
    # occurrence selects one of the two "a"s
    a0 = find_word(xp.pipe.tokenizer, PROMPT, "a", occurrence=1)
    one = tweak_embeddings(xp, PROMPT, [Reweight("a", 0.0, occurrence=1)]).embeds[0]
    assert torch.equal(one[a0], torch.zeros_like(E[a0]))
    assert torch.equal(one[find_word(xp.pipe.tokenizer, PROMPT, "a", occurrence=0)],
                       E[find_word(xp.pipe.tokenizer, PROMPT, "a", occurrence=0)])


def _cbs_reference(E: np.ndarray, positions, last, alpha, gamma, threshold, segments):
    """Straight loops over the formula of METHODS.md section 6."""
    out = E.copy()
    for c in positions:
        for a, b in segments:
            win = [i for i in range(c - gamma, c + gamma + 1) if 1 <= i <= last]
            S = np.stack([E[c, a:b] * E[i, a:b] for i in win])
            q = np.quantile(S.ravel(), threshold)
            S = np.where(S > q, S, 0.0)
            if S.max() <= 0:
                continue
            S = S / S.max()
            out[c, a:b] = (1 - alpha) * E[c, a:b] + alpha * sum(S[j] * E[i, a:b] for j, i in enumerate(win))
    return out


def test_cbs_analytic_and_reference():
    # gamma 0: S = f_c^2 = [1, 4, 9, 16]; median 6.5 keeps [9, 16] -> [0, 0, 9/16, 1];
    # f_c <- 0.75 f_c + 0.25 S * f_c = [0.75, 1.5, 2.25 + 27/64, 3 + 1]
    E = torch.zeros(5, 4, dtype=torch.float64)
    E[2] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = correct_by_similarities(E, [2], last=3, alpha=0.25, gamma=0, threshold=0.5)
    assert torch.allclose(out[2], torch.tensor([0.75, 1.5, 2.25 + 27 / 64, 4.0], dtype=torch.float64))
    assert torch.equal(out[[0, 1, 3, 4]], E[[0, 1, 3, 4]])
    g = torch.Generator().manual_seed(0)
    E = torch.randn(10, 8, generator=g, dtype=torch.float64)
    for kw in (dict(alpha=0.25, gamma=2, threshold=0.5), dict(alpha=0.7, gamma=1, threshold=0.2),
               dict(alpha=1.0, gamma=3, threshold=0.9)):
        # position 1 (next to BOS) and 6 (near last=6): the window never includes BOS or tokens past `last`
        for segs in ([(0, 8)], [(0, 3), (3, 8)]):
            got = correct_by_similarities(E, [1, 4, 6], last=6, segments=segs, **kw)
            ref = _cbs_reference(E.numpy(), [1, 4, 6], 6, kw["alpha"], kw["gamma"], kw["threshold"], segs)
            assert np.allclose(got.numpy(), ref, atol=1e-12)


def test_cbs_on_sdxl_treats_the_two_encoders_separately(tiny):
    xp = _xp(tiny, "sdxl")
    E = xp.encode_prompt(PROMPT).embeds[0].double()
    d1 = xp.pipe.text_encoder.config.hidden_size
    assert E.shape[1] == d1 + xp.pipe.text_encoder_2.config.hidden_size
    last = len(xp.pipe.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    pos = find_word(xp.pipe.tokenizer, PROMPT, "circle") + find_word(xp.pipe.tokenizer, PROMPT, "square")
    got = tweak_embeddings(xp, PROMPT, [CorrectionBySimilarities(["circle", "square"], alpha=0.4)]).embeds[0]
    ref = _cbs_reference(E.numpy(), pos, last, 0.4, 2, 0.5, [(0, d1), (d1, E.shape[1])])
    assert np.allclose(got.double().numpy(), ref, atol=1e-5)
    whole = _cbs_reference(E.numpy(), pos, last, 0.4, 2, 0.5, [(0, E.shape[1])])
    assert not np.allclose(ref, whole, atol=1e-4)  # the per-encoder split is not a no-op


def test_composition_order_matters_only_where_documented(tiny):
    xp = _xp(tiny, "sd1")
    a = [Remove("red"), Reweight("square", 3.0), Swap("blue", "green"), Interpolate("and", "the", 0.3)]
    ref = tweak_embeddings(xp, PROMPT, a).embeds
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert torch.equal(tweak_embeddings(xp, PROMPT, [a[i] for i in perm]).embeds, ref)
    # CBS reads its neighbours as the earlier tweaks left them: order with a neighbour's edit matters
    cbs, rw = CorrectionBySimilarities("circle", alpha=0.5), Reweight("red", 3.0)
    assert not torch.allclose(tweak_embeddings(xp, PROMPT, [cbs, rw]).embeds,
                              tweak_embeddings(xp, PROMPT, [rw, cbs]).embeds)
    # ... but not with an edit outside its window (gamma 2: "square" is 4 tokens away from "circle")
    far = Reweight("square", 3.0)
    assert torch.equal(tweak_embeddings(xp, PROMPT, [cbs, far]).embeds, tweak_embeddings(xp, PROMPT, [far, cbs]).embeds)
    # attention tweaks commute with embedding tweaks
    nms = CrossTokenNMS(alpha=0.5)
    assert np.array_equal(_tweaked(xp, [nms, Remove("red")]), _tweaked(xp, [Remove("red"), nms]))


# --------------------------------------------------------------------------------------------- cross-token NMS


def test_gaussian_kernel_and_smoothing_changes_the_winner():
    k = gaussian_kernel(1.0)
    z = 1 + 4 * math.exp(-0.5) + 4 * math.exp(-1.0)
    assert math.isclose(float(k[1, 1]), 1 / z, rel_tol=1e-12) and math.isclose(float(k[0, 0]), math.exp(-1) / z)
    assert math.isclose(float(k.sum()), 1.0)
    # token 0: a one-pixel spike of 1 at (2, 2); token 1: uniform 0.5; token 2: not selected, huge
    maps = torch.zeros(1, 3, 5, 5, dtype=torch.float64)
    maps[0, 0, 2, 2] = 1.0
    maps[0, 1] = 0.5
    maps[0, 2] = 100.0
    sel = torch.tensor([[True, True, False]])
    raw = nms_suppressed_mask(maps, sel, sigma=0.0).reshape(1, 5, 5, 3)
    assert not raw[0, 2, 2, 0] and raw[0, 2, 2, 1]  # unsmoothed, the spike wins its pixel
    assert raw[..., 0].sum() == 24 and not raw[..., 2].any()  # the unselected token is never suppressed
    smooth = nms_suppressed_mask(maps, sel, sigma=1.0).reshape(1, 5, 5, 3)
    assert smooth[..., 0].all() and not smooth[..., 1].any()  # smoothed spike 1/z = 0.204 < 0.5 everywhere


def test_nms_layer_output_matches_a_from_scratch_reference(tiny):
    xp = _xp(tiny, "sd1")
    unet = xp.unet
    name = next(k[:-len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor"))
    attn = dict(unet.named_modules())[name]
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["ctx"] = kwargs["encoder_hidden_states"]

    def post(module, args, kwargs, output):
        seen.setdefault("out", []).append(output)

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.register_forward_hook(post, with_kwargs=True)]
    x_t = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    emb = xp.encode_prompt(PROMPT)
    try:
        words = ["red", "circle", "square"]
        for alpha in (0.0, 1.0, 0.5):
            nms = CrossTokenNMS(words, alpha=alpha)
            with xp.hooks(nms.hook(xp, [PROMPT])):
                xp.predict_noise(x_t, 500, emb)
    finally:
        for h in handles:
            h.remove()
    plain, full, half = seen["out"]
    with torch.no_grad():
        x, c = seen["x"].double()[0], seen["ctx"].double()[0]
        H = attn.heads
        q, k, v = (torch.nn.functional.linear(t, m.weight.double(), None if m.bias is None else m.bias.double())
                   for t, m in ((x, attn.to_q), (c, attn.to_k), (c, attn.to_v)))
        q, k, v = (t.reshape(t.shape[0], H, -1).transpose(0, 1) for t in (q, k, v))  # (H, n, dh)
        p = torch.softmax(q @ k.transpose(1, 2) * attn.scale, -1)  # (H, Q, K)
        Q, K = p.shape[1], p.shape[2]
        h, w = 8, 12  # the first cross-attention layer works at the latent's resolution
        assert Q == h * w
        m = torch.sqrt(sum(p[i] ** 2 * (v[i] ** 2).sum(-1)[None] for i in range(H)))  # (Q, K)
        m = m.T.reshape(K, h, w)
        kern = gaussian_kernel(1.0)
        sm = torch.zeros_like(m)
        for y in range(h):
            for xx in range(w):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xc = min(max(y + dy, 0), h - 1), min(max(xx + dx, 0), w - 1)
                        sm[:, y, xx] += kern[dy + 1, dx + 1] * m[:, yy, xc]
        sel = sorted(p_ for wd in words for p_ in find_word(xp.pipe.tokenizer, PROMPT, wd))
        win = [sel[int(sm[sel].reshape(len(sel), -1)[:, i].argmax())] for i in range(Q)]
        keep = torch.ones(Q, K, dtype=torch.float64)
        for i in range(Q):
            for s in sel:
                if s != win[i]:
                    keep[i, s] = 0
        o = torch.cat([(p[i] * keep) @ v[i] for i in range(H)], -1)
        ref = torch.nn.functional.linear(o, attn.to_out[0].weight.double(), attn.to_out[0].bias.double())
    assert torch.allclose(full[0].double(), ref, atol=1e-5)
    assert torch.allclose(half[0], (plain[0] + full[0]) / 2, atol=1e-5)
    assert not torch.allclose(plain, full, atol=1e-4)


def test_nms_edits_only_the_conditional_rows_and_until_step(tiny):
    xp = _xp(tiny, "sd1")
    layer = next(k[:-len(".processor")] for k in xp.unet.attn_processors if k.endswith("attn2.processor"))
    attn = dict(xp.unet.named_modules())[layer]
    runs = {}
    for label, tweaks in (("plain", []), ("all", [CrossTokenNMS(alpha=1.0)]),
                          ("first", [CrossTokenNMS(alpha=1.0, until_step=1)]),
                          ("none", [CrossTokenNMS(alpha=1.0, until_step=0)])):
        outs = []
        handle = attn.register_forward_hook(lambda m, a, o, _outs=outs: _outs.append(o.clone()))
        try:
            img = _tweaked(xp, tweaks, num_inference_steps=3)
        finally:
            handle.remove()
        runs[label] = (img, outs)
    (plain, base), (_, full), (first_img, first) = runs["plain"], runs["all"], runs["first"]
    assert len(base) == len(full) == 3 and base[0].shape[0] == 2  # [uncond, cond] per step
    assert torch.equal(full[0][0], base[0][0])  # unconditional row untouched
    assert not torch.allclose(full[0][1], base[0][1], atol=1e-5)  # conditional row edited
    assert torch.equal(first[0], full[0])  # until_step=1: step 0 is edited like the unlimited run ...
    assert not torch.allclose(first[1], full[1], atol=1e-6)  # ... step 1 is not
    assert np.array_equal(runs["none"][0], plain)  # until_step=0: nothing happens
    assert not np.array_equal(first_img, plain)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(tiny):
    xp = _xp(tiny, "sd1")
    with pytest.raises(ValueError, match="word 'dog' is not in prompt"):
        _tweaked(xp, [CorrectionBySimilarities("dog")])
    with pytest.raises(ValueError, match="word 'dog' is not in prompt"):
        _tweaked(xp, [CrossTokenNMS(["dog"])])
    for make in (lambda: CorrectionBySimilarities("red", alpha=1.5), lambda: CrossTokenNMS(alpha=-0.1),
                 lambda: Remove("red", alpha=2), lambda: Swap("red", "blue", alpha=-1),
                 lambda: Interpolate("red", "blue", 1.1)):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
            make()
    with pytest.raises(ValueError, match=r"conflicting tweaks .* both edit token position 2 \('red'\)"):
        tweak_embeddings(xp, PROMPT, [Remove("red"), Swap("red", "green")])
    with pytest.raises(ValueError, match="conflicting tweaks"):
        tweak_embeddings(xp, PROMPT, [CorrectionBySimilarities(["red", "circle"]), Reweight("red circle", 2)])
    with pytest.raises(ValueError, match="at most one CrossTokenNMS"):
        _tweaked(xp, [CrossTokenNMS(), CrossTokenNMS(alpha=0.2)])
    with pytest.raises(ValueError, match="tokenises into"):
        tweak_embeddings(xp, PROMPT, [Swap("red", "giraffe")])  # giraffe is several tokens in the test vocab
    with pytest.raises(ValueError, match="builds prompt_embeds itself"):
        generate_with_tweaks(xp, PROMPT, [], prompt_embeds=torch.zeros(1))
    with pytest.raises(ValueError, match="must be tweak objects"):
        _tweaked(xp, ["cbs:red"])
    with pytest.raises(ValueError, match="factor must be a finite number"):
        Reweight("red", float("nan"))


# --------------------------------------------------------------------------------------------- CLI


def test_parse_tweak_specs():
    assert parse_tweak("cbs:red,circle") == CorrectionBySimilarities(["red", "circle"])
    assert parse_tweak("cbs:circle:alpha=0.3,gamma=1,threshold=0.2") == CorrectionBySimilarities(
        "circle", alpha=0.3, gamma=1, threshold=0.2)
    assert parse_tweak("nms") == CrossTokenNMS()
    assert parse_tweak("nms:alpha=0.3,until_step=5") == CrossTokenNMS(alpha=0.3, until_step=5)
    assert parse_tweak("nms:red,circle:sigma=0.5") == CrossTokenNMS(["red", "circle"], sigma=0.5)
    assert parse_tweak("reweight:red=2.5") == Reweight("red", 2.5)
    assert parse_tweak("remove:red:alpha=0.5") == Remove("red", alpha=0.5)
    assert parse_tweak("swap:red=blue") == Swap("red", "blue")
    assert parse_tweak("interpolate:red=blue:t=0.25") == Interpolate("red", "blue", 0.25)
    for bad, msg in (("blur:red", "unknown tweak 'blur'.*allowed: cbs, nms"), ("cbs", "cbs needs concept words"),
                     ("cbs:red:beta=1", "unknown option 'beta=1'"), ("reweight:red", "WORD=FACTOR"),
                     ("interpolate:red=blue", "needs t"), ("cbs:red:alpha=x", "alpha must be a float")):
        with pytest.raises(ValueError, match=msg):
            parse_tweak(bad)


def test_cli_writes_a_plain_tweaked_grid(tiny, tmp_path, monkeypatch):
    import diffusion_xai.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda spec, device=None: _xp(tiny, "sd1"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["generate", PROMPT, "--tweak", "cbs:red,circle", "--tweak", "nms", "--out",
                              str(tmp_path), "--num-images", "2", "--seed", "5", "--height", "32", "--width", "32"])
    assert args.func(args) == 0
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    xp = _xp(tiny, "sd1")
    kw = dict(output_type="pil", progress=False, height=32, width=32)
    for row, seed in enumerate((5, 6)):
        plain = np.asarray(xp.generate(PROMPT, seed=seed, **kw).images[0])
        tw = np.asarray(generate_with_tweaks(xp, PROMPT, [CorrectionBySimilarities(["red", "circle"]), CrossTokenNMS()],
                                             seed=seed, **kw).images[0])
        s, gap = 256 // 32, 4
        y = row * (32 * s + gap)
        assert np.array_equal(grid[y:y + 32 * s:s, 0:32 * s:s], plain)
        assert np.array_equal(grid[y:y + 32 * s:s, 32 * s + gap::s], tw)
        assert not np.array_equal(plain, tw)
    summary = json.loads((tmp_path / "tweaks.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["columns"] == ["plain", "tweaked"]
