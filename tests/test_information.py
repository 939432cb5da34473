"""Pointwise information and DiffusionPID: analytic Gaussian known answers, reference formulas, costs, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffusion_xai import XAIPipeline
from diffusion_xai.information import (
    PID_TERMS,
    PIDResult,
    estimate_information,
    information,
    logistic_logsnr,
    pid,
    pid_maps,
)

C, H, W = 4, 8, 8
A0, A1 = -5.0, 7.0  # the default logSNR range loc -/+ scale*clip


# ------------------------------------------------------------------------------------------ analytic Gaussians
def gaussian_eps_fn(mus: torch.Tensor, sds: torch.Tensor):
    """Exact MMSE denoiser when x | condition k ~ N(mus[k], sds[k]^2 I):
    eps_hat(x_a) = sigma (x_a - alpha mu) / (alpha^2 s^2 + sigma^2), alpha^2 = sigmoid(a)."""
    def fn(x, a, cond):
        ab = torch.sigmoid(a).view(-1, 1, 1, 1)
        s2 = (sds[cond] ** 2).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mus[cond]) / (ab * s2 + (1 - ab))
    return fn


def truncation(s: float, a0: float = A0, a1: float = A1) -> float:
    """int_{a0}^{a1} e^a / (1 + s^2 e^a)^2 da * s^2: the share of the full integral inside [a0, a1]."""
    return 1 / (1 + s * s * math.exp(a0)) - 1 / (1 + s * s * math.exp(a1))


def _means(seed=1, n=2, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(C, H, W, generator=g, dtype=torch.float64) * scale for _ in range(n)]


def test_logistic_samples_cover_the_range_and_weights_integrate():
    a, w = logistic_logsnr(1000, generator=torch.Generator().manual_seed(0))
    assert a.min() >= A0 and a.max() <= A1 and a.min() < A0 + 0.2 and a.max() > A1 - 0.2
    # weights are 1/density: the mean weight estimates the length of the range, mean(w * a) its integral of a
    assert abs(w.mean().item() - (A1 - A0)) / (A1 - A0) < 1e-3
    assert abs((w * a).mean().item() - (A1 ** 2 - A0 ** 2) / 2) < 0.05
    # weight formula of METHODS.md: scale * tanh(clip/2) / (sigmoid(u') sigmoid(-u')), u' = (a - loc) / scale
    u = (a - 1.0) / 2.0
    assert torch.allclose(w, 2.0 * math.tanh(1.5) / (torch.sigmoid(u) * torch.sigmoid(-u)))


def test_gaussian_equal_variance_matches_closed_form():
    """x|y ~ N(mu_y, s^2): eps_hat(x_a, y) - eps_hat(x_a, c) = alpha sigma (mu_c - mu_y) / (alpha^2 s^2 + sigma^2),
    whose integral is ||mu_y - mu_c||^2 / (2 s^2) per pixel (the KL divergence), times the truncation share."""
    mu0, d = _means()
    s = 0.8
    x0 = mu0 + d + s * torch.randn(C, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fn = gaussian_eps_fn(torch.stack([mu0, mu0 + d]), torch.tensor([s, s], dtype=torch.float64))
    full_map = (d ** 2).sum(0) / (2 * s * s)
    exact_map = full_map * truncation(s)
    errs = {}
    for n in (10, 100, 1000):
        errs[n] = []
        for seed in range(5):
            est = estimate_information(fn, x0, 2, [(1, 0)], n, generator=torch.Generator().manual_seed(seed))
            assert torch.allclose(est.maps[0].sum(), est.values[0])
            errs[n].append(abs(est.values[0].item() / exact_map.sum().item() - 1))
            if n == 100:  # the default sample count: within 5% of the truncated and of the full closed form
                assert errs[n][-1] < 0.05
                assert abs(est.values[0].item() / full_map.sum().item() - 1) < 0.05
                # pixel map: the integrand is the same function of a in every pixel, scaled by ||d_p||^2
                assert torch.allclose(est.maps[0] / est.values[0], exact_map / exact_map.sum(), atol=1e-12)
    assert np.mean(errs[1000]) < np.mean(errs[100]) < np.mean(errs[10])


def test_gaussian_unequal_variance_matches_quadrature_and_converges():
    """Different variances make the integrand depend on x and eps; the reference is exact in eps
    (Gaussian expectation) and Gauss-Legendre (400 nodes) in a."""
    mu0, d = _means(seed=2)
    s0, s1 = 1.0, 0.6
    x0 = mu0 + d + s1 * torch.randn(C, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fn = gaussian_eps_fn(torch.stack([mu0, mu0 + d]), torch.tensor([s0, s1], dtype=torch.float64))
    nodes, wts = np.polynomial.legendre.leggauss(400)
    a = torch.tensor((nodes + 1) / 2 * (A1 - A0) + A0).view(-1, 1, 1, 1)
    wq = torch.tensor(wts * (A1 - A0) / 2).view(-1, 1, 1, 1)
    ab = torch.sigmoid(a)
    sg2 = 1 - ab
    d1, d0 = ab * s1 ** 2 + sg2, ab * s0 ** 2 + sg2
    g = 1 / d1 - 1 / d0
    # E_eps of (sigma [g x_a - alpha (mu1/d1 - mu0/d0)])^2 with x_a = alpha x + sigma eps
    integrand = sg2 * ((g * ab.sqrt() * x0 - ab.sqrt() * ((mu0 + d) / d1 - mu0 / d0)) ** 2 + g ** 2 * sg2)
    exact_map = (integrand * wq).sum(0).sum(0) / 2
    exact = exact_map.sum().item()
    errs, map_errs = {}, {}
    for n in (10, 100, 1000):
        errs[n], map_errs[n] = [], []
        for seed in range(4):
            est = estimate_information(fn, x0, 2, [(1, 0)], n, generator=torch.Generator().manual_seed(seed),
                                       samples_per_call=37)
            errs[n].append(abs(est.values[0].item() / exact - 1))
            map_errs[n].append(((est.maps[0] - exact_map).abs().sum() / exact).item())
            assert (est.maps[0] >= 0).all()
            if n == 100:
                assert errs[n][-1] < 0.05
                assert est.stderr[0] > 0
    assert np.mean(errs[1000]) < np.mean(errs[10])
    assert np.mean(map_errs[1000]) < np.mean(map_errs[100]) < np.mean(map_errs[10])


def test_gaussian_pid_known_answers():
    """Mean shifts d1 (word 1) and d2 (word 2) plus an interaction d12: the exact maps are
    I1 = |d1|^2 T/(2 s^2), I2 = |d2|^2 T/(2 s^2), I12 = |d1 + d2 + d12|^2 T/(2 s^2) per pixel."""
    mu0, d1, d2, d12 = _means(seed=4, n=4)
    d1[:, :, 4:] = 0  # word 1 lives on the left half
    d2[:, :, :2] = 0  # word 2 on the right three quarters: overlap in columns 2-3
    s = 1.0
    mus = torch.stack([mu0, mu0 + d1, mu0 + d2, mu0 + d1 + d2 + d12])
    fn = gaussian_eps_fn(mus, torch.full((4,), s, dtype=torch.float64))
    calls = []

    def counting(x, a, c):
        calls.append((x.shape[0], c.tolist()))
        return fn(x, a, c)
    est = estimate_information(counting, mu0, 4, [(1, 0), (2, 0), (3, 0)], 100,
                               generator=torch.Generator().manual_seed(0), samples_per_call=25)
    # one call per block of 25 samples, each holding the 4 conditions of every sample
    assert calls == [(100, [0, 1, 2, 3] * 25)] * 4
    k = truncation(s) / (2 * s * s)
    exact = [(d1 ** 2).sum(0) * k, (d2 ** 2).sum(0) * k, ((d1 + d2 + d12) ** 2).sum(0) * k]
    for m, e in zip(est.maps, exact):
        assert abs(m.sum().item() / e.sum().item() - 1) < 0.05
    t = pid_maps(*est.maps)
    # consistency equations hold exactly (to float rounding), per pixel and at image level
    assert torch.allclose(t["R"] + t["U1"], t["I1"], rtol=0, atol=1e-12)
    assert torch.allclose(t["R"] + t["U2"], t["I2"], rtol=0, atol=1e-12)
    assert torch.allclose(t["R"] + t["U1"] + t["U2"] + t["S"], t["I12"], rtol=0, atol=1e-12)
    # min redundancy: zero where only one word acts (exactly: those pixels' differences are exactly 0)
    assert (t["R"][:, :2] == 0).all() and (t["R"][:, 4:] == 0).all() and (t["R"][:, 2:4] > 0).all()
    assert torch.equal(t["U1"][:, 4:], torch.zeros_like(t["U1"][:, 4:]))
    # a duplicated word: all of its information is redundant, none unique
    t2 = pid_maps(est.maps[0], est.maps[0].clone(), est.maps[0])
    assert torch.equal(t2["R"], est.maps[0]) and (t2["U1"] == 0).all() and (t2["U2"] == 0).all()
    # a pluggable redundancy
    t3 = pid_maps(*est.maps, redundancy=lambda a, b: torch.zeros_like(a))
    assert (t3["R"] == 0).all() and torch.equal(t3["U1"], est.maps[0])
    with pytest.raises(ValueError, match="unknown redundancy 'mmi'"):
        pid_maps(*est.maps, redundancy="mmi")
    with pytest.raises(ValueError, match="redundancy returned shape"):
        pid_maps(*est.maps, redundancy=lambda a, b: a.sum())


# ------------------------------------------------------------------------------------------ on pipelines
def _xp(tiny, kind="sd1", batch_size=16):
    return XAIPipeline(tiny(kind), batch_size=batch_size, default_steps=2)


def _image(xp, prompt="a red circle and a blue square", seed=0):
    return xp.generate(prompt, seed=seed, height=32, width=32, progress=False).images[0]


def test_information_matches_a_direct_implementation_of_the_formula(tiny):
    """The pipeline path (conditions, snapping to trained timesteps, batching) against a naive loop
    written straight from METHODS.md with add_noise / predict_noise."""
    xp = _xp(tiny, batch_size=5)
    prompt = "a red circle and a blue square"
    img = _image(xp, prompt)
    n = 7
    res = information(xp, img, prompt, words="red", num_samples=n, seed=3, progress=False)
    assert res.conditions == ["a circle and a blue square", prompt]
    assert res.unet_evals == 2 * n
    g = torch.Generator("cpu").manual_seed(3)
    a, w = logistic_logsnr(n, generator=g)
    x0 = xp.encode_image(img)
    emb = xp.encode_prompt(["a circle and a blue square", prompt])
    total = torch.zeros(x0.shape[-2:], dtype=torch.float64)
    noise = torch.randn(n, *x0.shape[1:], generator=g)
    for i in range(n):
        eps = noise[i:i + 1]
        t = int(xp.logsnr_to_t(a[i]))
        x_t = xp.add_noise(x0, eps, t)
        e_lo = xp.predict_noise(x_t, t, emb.index([0]))
        e_hi = xp.predict_noise(x_t, t, emb.index([1]))
        total += w[i] * (e_hi - e_lo).double().pow(2).sum(1)[0] / 2
    ref = total / n
    # float32 UNet outputs differ slightly between batch layouts; the differences of two predictions amplify it
    assert torch.allclose(res.pixel_map, ref, rtol=1e-3, atol=1e-3 * ref.max().item())
    assert abs(res.value - ref.sum().item()) < 1e-4 * ref.sum().item()
    assert abs(res.pixel_map.sum().item() - res.value) < 1e-9 * res.value
    assert (res.pixel_map >= 0).all() and res.value > 0
    up = res.image_map()
    assert up.shape == (32, 32) and abs(up.sum().item() / res.value - 1) < 0.02
    json.dumps(res.to_dict())


def test_information_contexts_and_words(tiny):
    xp = _xp(tiny)
    prompt = "a red circle and a blue square"
    img = _image(xp, prompt)
    lat = xp.encode_image(img)
    kw = dict(num_samples=3, progress=False)
    assert information(xp, lat, prompt, words="red", context=None, **kw).conditions == ["", "red"]
    assert information(xp, lat, prompt, words=["red", "blue square"], context="circle", **kw).conditions == [
        "circle", "red circle blue square"]
    r = information(xp, lat, prompt, words=None, **kw)
    assert r.conditions == ["", prompt] and r.value > 0
    # "a" occurs twice: both occurrences are removed
    assert information(xp, lat, prompt, words="a", **kw).conditions[0] == "red circle and blue square"
    # a latent and its image give the same answer
    a1 = information(xp, img, prompt, words="red", **kw)
    a2 = information(xp, lat, prompt, words="red", **kw)
    assert torch.allclose(a1.pixel_map, a2.pixel_map)


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_pid_costs_exactly_4n_evals_with_4_conditions_per_call(tiny, kind):
    xp = _xp(tiny, kind, batch_size=8)
    prompt = "a red circle and a blue square"
    img = _image(xp, prompt)
    batches = []
    handle = xp.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].clone()))
    try:
        e0 = xp.unet_evals
        res = pid(xp, img, "red", "circle", prompt=prompt, num_samples=5, progress=False)
        assert xp.unet_evals - e0 == 20 == res.unet_evals
    finally:
        handle.remove()
    assert [b.shape[0] for b in batches] == [8, 8, 4]
    for b in batches:  # the 4 rows of a sample share x_a
        g = b.view(-1, 4, *b.shape[1:])
        assert torch.equal(g, g[:, :1].expand_as(g))
    assert res.conditions == ["a and a blue square", "a red and a blue square", "a circle and a blue square", prompt]
    assert res.generation_evals == 0
    _check_pid(res)


def _check_pid(res: PIDResult):
    m = {k: res.map(k) for k in PID_TERMS}
    for k in ("I1", "I2", "I12"):
        assert (m[k] >= 0).all() and getattr(res, k) > 0
        assert abs(m[k].sum().item() - getattr(res, k)) <= 1e-12 * getattr(res, k)
    assert torch.allclose(m["R"], torch.minimum(m["I1"], m["I2"]))
    assert torch.allclose(m["R"] + m["U1"], m["I1"], rtol=0, atol=1e-12)
    assert torch.allclose(m["R"] + m["U2"], m["I2"], rtol=0, atol=1e-12)
    assert torch.allclose(m["R"] + m["U1"] + m["U2"] + m["S"], m["I12"], rtol=0, atol=1e-12)
    s = res.scalars
    assert abs(s["R"] + s["U1"] - s["I1"]) < 1e-9 * s["I1"]
    assert abs(s["R"] + s["U1"] + s["U2"] + s["S"] - s["I12"]) < 1e-9 * s["I12"]
    assert (m["U1"] >= 0).all() and (m["U2"] >= 0).all()


def test_pid_from_prompt_generates_seeded_image_and_round_trips(tiny, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    xp = _xp(tiny)
    prompt = "a red circle and a blue square"
    res = pid(xp, prompt, "red", "blue", num_samples=4, seed=2, height=32, width=32, progress=False)
    ref = xp.generate(prompt, seed=2, height=32, width=32, progress=False).images[0]
    assert np.array_equal(np.asarray(res.image), np.asarray(ref))
    assert res.generation_evals == 2 * 2 and res.unet_evals == 16
    # same seed, same numbers; the given image gives the same maps
    again = pid(xp, ref, "red", "blue", prompt=prompt, num_samples=4, seed=2, progress=False)
    assert torch.equal(again.maps, res.maps)
    assert res.maps.shape == (7, 16, 16) and res.image_map("S").shape == (32, 32)
    res.save(tmp_path / "r")
    back = PIDResult.load(tmp_path / "r")
    assert torch.equal(back.maps, res.maps) and back.scalars == res.scalars and back.conditions == res.conditions
    d = json.loads(json.dumps(res.to_dict()))
    assert d["scalars"]["R"] == res.R and d["unet_evals"] == 16
    fig = res.plot()
    assert len([a for a in fig.axes if a.get_title()]) == 6
    assert len(res.plot_bars().axes[0].patches) == 7
    matplotlib.pyplot.close("all")


def test_pid_unconditional_and_embedding_removal(tiny):
    xp = _xp(tiny)
    prompt = "a red circle and a blue square"
    img = _image(xp, prompt)
    r = pid(xp, img, "circle", "disc", conditional=False, num_samples=3, progress=False)
    assert r.conditions == ["", "circle", "disc", "circle disc"]
    _check_pid(r)
    e = pid(xp, img, "red", "circle", prompt=prompt, removal="embedding", num_samples=3, progress=False)
    assert e.conditions == ["a _ _ and a blue square", "a red _ and a blue square", "a _ circle and a blue square",
                            prompt]
    _check_pid(e)
    s = pid(xp, img, "red", "circle", prompt=prompt, removal="string", num_samples=3, progress=False)
    assert not torch.allclose(e.maps, s.maps)
    # the embedding-level condition: the full caption's embeddings with the removed words' positions
    # replaced by the empty prompt's
    from diffusion_xai.information import _build_conditions
    from diffusion_xai.tokens import find_word

    conds = _build_conditions(xp, prompt, [{0, 2}, set(range(7))], "embedding")
    full, empty = xp.encode_prompt(prompt).embeds[0], xp.encode_prompt("").embeds[0]
    gone = find_word(xp.pipe.tokenizer, prompt, "red") + [p for w in ("and", "blue", "square")
                                                         for p in find_word(xp.pipe.tokenizer, prompt, w)]
    gone += find_word(xp.pipe.tokenizer, prompt, "a", occurrence=1)
    kept = [p for p in range(full.shape[0]) if p not in gone]
    assert torch.equal(conds.embeddings.embeds[1], full)
    assert torch.equal(conds.embeddings.embeds[0][gone], empty[gone])
    assert torch.equal(conds.embeddings.embeds[0][kept], full[kept])


def test_bad_inputs_raise_clear_errors(tiny):
    xp = _xp(tiny)
    prompt = "a red circle and a blue square"
    lat = xp.encode_image(_image(xp, prompt))
    kw = dict(num_samples=2, progress=False)
    with pytest.raises(ValueError, match="word 'dog' is not in prompt 'a red circle and a blue square'; words: a, red"):
        pid(xp, lat, "dog", "circle", prompt=prompt, **kw)
    with pytest.raises(ValueError, match="same word 'red'"):
        pid(xp, lat, "red", "red", prompt=prompt, **kw)
    with pytest.raises(ValueError, match="same word 'red'"):
        pid(xp, lat, "red", "Red", conditional=False, **kw)
    with pytest.raises(ValueError, match="share the word"):
        pid(xp, lat, "red circle", "circle", prompt=prompt, **kw)
    with pytest.raises(ValueError, match="needs its caption"):
        pid(xp, lat, "red", "circle", **kw)
    with pytest.raises(ValueError, match="context '' is empty"):
        information(xp, lat, prompt, words="red", context="", **kw)
    with pytest.raises(ValueError, match=r"context \[\] is empty"):
        information(xp, lat, prompt, words="red", context=[], **kw)
    with pytest.raises(ValueError, match="share the word"):
        information(xp, lat, prompt, words="red", context=["red", "circle"], **kw)
    with pytest.raises(ValueError, match="share the word"):
        information(xp, lat, prompt, words=["red", "red"], **kw)
    with pytest.raises(ValueError, match="word 'dog' is not in prompt"):
        information(xp, lat, prompt, words="red", context="dog", **kw)
    for clip in (0, -1.0):
        with pytest.raises(ValueError, match=f"clip must be > 0.*got {clip}"):
            pid(xp, lat, "red", "circle", prompt=prompt, num_samples=2, clip=clip, progress=False)
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"num_samples must be an integer >= 1, got {n}"):
            information(xp, lat, prompt, words="red", num_samples=n, progress=False)
    with pytest.raises(ValueError, match="scale must be > 0"):
        information(xp, lat, prompt, words="red", scale=0, **kw)
    with pytest.raises(ValueError, match="removal must be one of string, embedding, got 'mask'"):
        pid(xp, lat, "red", "circle", prompt=prompt, removal="mask", **kw)
    with pytest.raises(ValueError, match="unknown redundancy"):
        pid(xp, lat, "red", "circle", prompt=prompt, redundancy="mmi", **kw)
    with pytest.raises(ValueError, match="one image or latent at a time"):
        information(xp, lat.expand(2, -1, -1, -1), prompt, words="red", **kw)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        information(xp, lat, "  ", words="red", **kw)
    assert xp.unet_evals == 2 * 2  # only the generation above: every error came before any UNet work


def test_cli_pid_writes_pngs_and_json(tiny, tmp_path, monkeypatch):
    import argparse

    from diffusion_xai import cli
    from diffusion_xai.information import register

    monkeypatch.setattr(cli, "load_model", lambda spec, device=None: _xp(tiny))
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    out = tmp_path / "o"
    a = p.parse_args(["pid", "a red circle and a blue square", "--pair", "red,circle", "--samples", "3",
                      "--height", "32", "--width", "32", "--out", str(out)])
    assert a.func(a) == 0
    d = json.loads((out / "pid.json").read_text())
    assert d["unet_evals"] == 12 and set(d["scalars"]) == set(PID_TERMS)
    for f in d["files"]:
        assert (tmp_path / f).exists() or __import__("pathlib").Path(f).exists()
    assert PIDResult.load(out / "result").word2 == "circle"
    bad = p.parse_args(["pid", "a red circle", "--pair", "red", "--out", str(out)])
    with pytest.raises(ValueError, match="--pair must be two comma-separated words"):
        bad.func(bad)
