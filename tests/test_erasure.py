"""Concept erasure (UCE closed form, RealEra neighbours, ESD fine-tuning, debias) as LoRA adapters."""

from __future__ import annotations

import argparse
import hashlib
import math

import numpy as np
import pytest
import torch

from diffusion_xai import XAIPipeline
from diffusion_xai.erasure import (
    Edit,
    closed_form_factors,
    cross_attention_modules,
    edit_vectors,
    erase,
    harmonic_h,
    sample_neighbors,
)
from diffusion_xai.testing import tiny_pipeline


@pytest.fixture
def xp():
    """A fresh tiny SD 1.x wrapper per test (edits must not leak between tests)."""
    return XAIPipeline(tiny_pipeline("sd1"), default_steps=2)


def _gen(xp, prompt="a red circle", seed=3):
    return xp.generate(prompt, seed=seed, output_type="np", progress=False, height=32, width=32).images


def _effective(unet, name) -> torch.Tensor:
    """The linear map a (possibly LoRA-wrapped) to_k/to_v computes, as a (out, in) float64 matrix."""
    m = unet.get_submodule(name)
    d = m.get_base_layer().in_features if hasattr(m, "get_base_layer") else m.in_features
    with torch.no_grad():
        return m(torch.eye(d)).double().T


def _base_hash(unet) -> str:
    """sha256 of every base parameter (LoRA factors excluded, peft's '.base_layer' stripped from names)."""
    h = hashlib.sha256()
    items = sorted((n.replace(".base_layer", ""), p) for n, p in unet.named_parameters() if "lora_" not in n)
    for n, p in items:
        h.update(n.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _lstsq_edit(W, C, G, P, lam, es, ps) -> torch.Tensor:
    """argmin_W' lam|W'-W|^2 + es sum|W'c_i - W g_i|^2 + ps sum|W'c_j - W c_j|^2, by least squares (no formula)."""
    D = W.shape[1]
    lhs = torch.cat([math.sqrt(lam) * torch.eye(D, dtype=torch.float64), math.sqrt(es) * C, math.sqrt(ps) * P])
    rhs = torch.cat([math.sqrt(lam) * W.T, math.sqrt(es) * G @ W.T, math.sqrt(ps) * P @ W.T])
    return torch.linalg.lstsq(lhs, rhs).solution.T


# ------------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("positions", ["last", "word_to_eos"])
def test_closed_form_equals_least_squares_and_lora_reproduces_weights(xp, positions):
    lam, es, ps = 0.7, 1.5, 0.8
    edit = erase(xp, ["circle"], preserve=["square", "cross"], templates=["{}", "a red {}"], lam=lam,
                 erase_scale=es, preserve_scale=ps, token_positions=positions, progress=False)
    vec = edit.vectors
    n_rows = 2 if positions == "last" else (77 - 1) + (77 - 3)  # "circle" at 1 and at 3 ("a red circle")
    assert vec.erase.shape == (n_rows, 32) and vec.preserve.shape[0] == (2 * 2 if positions == "last" else 4 * 75)
    # rank = number of edit vectors, or the input width when there are more vectors than dimensions
    assert edit.rank == min(n_rows, 32)
    for name in edit.modules:
        W = edit.xp.unet.get_submodule(name).get_base_layer().weight.detach().double()
        want = _lstsq_edit(W, vec.erase, vec.guide, vec.preserve, lam, es, ps)
        got = _effective(xp.unet, name)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (name, (got - want).abs().max())
        assert torch.allclose(W + edit.delta(name), want, atol=1e-5, rtol=0)


def test_small_lambda_maps_concept_to_guide_and_keeps_preserved(xp):
    """Analytic limit: lam -> 0 with n + m <= D makes W' c_i = W g_i and W' c_j = W c_j exactly."""
    edit = erase(xp, "circle", preserve=["square", "triangle"], guide="cross", templates=["{}", "a {}"], lam=1e-6)
    vec = edit.vectors
    for name in edit.modules:
        W = xp.unet.get_submodule(name).get_base_layer().weight.detach().double()
        Wn = _effective(xp.unet, name)
        assert torch.allclose(vec.erase @ Wn.T, vec.guide @ W.T, atol=2e-4)
        assert torch.allclose(vec.preserve @ Wn.T, vec.preserve @ W.T, atol=2e-4)
    # the guide vector of "circle" in "a {}" is the embedding of "cross" in "a cross" at the same position
    e = xp.encode_prompt("a cross").embeds[0].double()
    assert torch.allclose(vec.guide[1], e[2])


def test_closed_form_factors_formula_and_wide_case():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    C, G = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    P = torch.randn(2, 4, generator=g, dtype=torch.float64)
    B, A = closed_form_factors(W, C, G, P, lam=0.3, erase_scale=2.0, preserve_scale=0.5)
    assert A.shape == (4, 4) and torch.equal(A, torch.eye(4, dtype=torch.float64))  # 6 vectors > 4 dims
    M = 0.3 * torch.eye(4, dtype=torch.float64) + 2.0 * C.T @ C + 0.5 * P.T @ P
    direct = (0.3 * W + 2.0 * (W @ G.T) @ C + 0.5 * W @ P.T @ P) @ torch.linalg.inv(M)  # METHODS.md formula
    assert torch.allclose(W + B @ A, direct, atol=1e-10)
    B2, A2 = closed_form_factors(W, C[:2], G[:2], P)
    assert B2.shape == (5, 2) and A2.shape == (2, 4)


# ------------------------------------------------------------------------------------------- adapters


def test_base_weights_never_change_and_disable_remove_restore_bit_identically(xp):
    base_img, h0 = _gen(xp), _base_hash(xp.unet)
    modules = cross_attention_modules(xp.unet)
    rng = torch.random.get_rng_state()
    edit = erase(xp, "circle", preserve=["square"], templates=["{}", "a red {}"])
    assert torch.equal(rng, torch.random.get_rng_state())  # peft's init ran on a forked RNG
    edited = _gen(xp)
    assert np.abs(edited - base_img).max() > 1e-3
    assert _base_hash(xp.unet) == h0
    edit.disable()
    assert np.array_equal(_gen(xp), base_img)
    edit.enable()
    assert np.array_equal(_gen(xp), edited)
    with edit.disabled():
        assert np.array_equal(_gen(xp), base_img)
    assert edit.enabled and np.array_equal(_gen(xp), edited)
    edit.remove()
    assert np.array_equal(_gen(xp), base_img) and _base_hash(xp.unet) == h0
    # the last removal unwraps the LoRA layers: the original nn.Linear modules are back
    assert all(type(xp.unet.get_submodule(n)) is torch.nn.Linear for n in modules)
    assert not getattr(xp.unet, "peft_config", None)
    with pytest.raises(RuntimeError, match="removed"):
        edit.enable()


def test_several_edits_add_up_and_switch_independently(xp):
    e1 = erase(xp, "circle", templates=["a {}"])
    e2 = erase(xp, "red", preserve=["blue"], templates=["a {} square"])
    assert e1.name != e2.name
    name = e1.modules[3]
    W = xp.unet.get_submodule(name).get_base_layer().weight.detach().double()
    d1, d2 = e1.delta(name), e2.delta(name)
    assert torch.allclose(_effective(xp.unet, name), W + d1 + d2, atol=1e-6)
    e1.disable()
    assert torch.allclose(_effective(xp.unet, name), W + d2, atol=1e-6)
    e1.enable(scale=0.5)
    assert torch.allclose(_effective(xp.unet, name), W + 0.5 * d1 + d2, atol=1e-6)
    e2.remove()
    assert torch.allclose(_effective(xp.unet, name), W + 0.5 * d1, atol=1e-6)
    e1.set_scale(0.0)
    assert torch.allclose(_effective(xp.unet, name), W, atol=0)


def test_fuse_only_on_request(xp):
    edit = erase(xp, "circle", templates=["a {}"])
    edited = _gen(xp)
    name = edit.modules[0]
    W = xp.unet.get_submodule(name).get_base_layer().weight.detach().double().clone()
    want = W + edit.delta(name)
    edit.fuse()
    assert edit.removed and edit.fused
    assert type(xp.unet.get_submodule(name)) is torch.nn.Linear
    assert torch.allclose(xp.unet.get_submodule(name).weight.double(), want, atol=1e-6)
    assert np.abs(_gen(xp) - edited).max() < 1e-4


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_save_then_plain_diffusers_load_gives_identical_outputs(tmp_path, kind):
    xp = XAIPipeline(tiny_pipeline(kind), default_steps=2)
    edit = erase(xp, "circle", preserve=["square"], templates=["{}", "a red {}"])
    edited = _gen(xp)
    edit.save(tmp_path / "e")
    fresh = tiny_pipeline(kind)
    fresh.load_lora_weights(str(tmp_path / "e"))
    assert np.array_equal(_gen(XAIPipeline(fresh, default_steps=2)), edited)
    # and back as a handle on the original model, after removing the edit
    edit.remove()
    again = Edit.load(xp, tmp_path / "e")
    assert again.concepts == ["circle"] and again.method == "closed_form" and again.rank == edit.rank
    assert np.array_equal(_gen(xp), edited)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_errors(xp, tmp_path):
    for bad in ["", "   "]:
        with pytest.raises(ValueError, match="tokenises to nothing"):
            erase(xp, bad)
    with pytest.raises(ValueError, match="both erased and preserved"):
        erase(xp, ["circle", "square"], preserve=["square", "circle"])
    with pytest.raises(ValueError, match="both erased and preserved"):
        erase(xp, "Circle", preserve="circle")
    for lam in [0, -1.0, float("nan")]:
        with pytest.raises(ValueError, match="lam must be"):
            erase(xp, "circle", lam=lam)
    with pytest.raises(ValueError, match="method must be one of"):
        erase(xp, "circle", method="magic")
    with pytest.raises(ValueError, match="token_positions must be one of"):
        erase(xp, "circle", token_positions="first")
    with pytest.raises(ValueError, match="exactly one"):
        erase(xp, "circle", templates=["a photo"])
    with pytest.raises(ValueError, match="no neighbour satisfies"):
        erase(xp, "circle", method="neighbors", d1=0.1, s1=0.5, s2=0.9)
    assert not getattr(xp.unet, "peft_config", None)  # failed calls leave nothing behind
    edit = erase(xp, "circle")
    edit.save(tmp_path / "sd1_edit")
    other = XAIPipeline(tiny_pipeline("sdxl"), default_steps=2)
    with pytest.raises(ValueError, match="made for another architecture"):
        Edit.load(other, tmp_path / "sd1_edit")
    assert not getattr(other.unet, "peft_config", None)
    with pytest.raises(FileNotFoundError, match="no saved edit"):
        Edit.load(xp, tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- neighbours


def test_neighbors_lie_in_the_band_and_join_the_erase_set(xp):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 32, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [20.0]])
    nb = sample_neighbors(e, 200, d1=0.5, s1=0.9, s2=0.97, generator=g)
    base = e.repeat_interleave(200, 0)
    dist = (nb - base).norm(dim=1) / base.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(nb, base, dim=1)
    assert dist.max() <= 0.5 + 1e-9 and cos.min() >= 0.9 - 1e-9 and cos.max() <= 0.97 + 1e-9
    assert cos.max() - cos.min() > 0.05  # the band is covered, not one point

    edit = erase(xp, "circle", method="neighbors", num_neighbors=5, d1=0.5, s1=0.9, s2=0.97, templates=["a {}"],
                 preserve=["square"], preserve_neighbors=2, lam=1e-6)
    vec = edit.vectors
    assert vec.erase.shape[0] == 1 + 5 and edit.rank == 6 and vec.preserve.shape[0] == 1 + 2
    assert torch.equal(vec.guide[1:], vec.guide[:1].expand(5, -1))  # neighbours go where the concept goes
    name = edit.modules[0]
    W = xp.unet.get_submodule(name).get_base_layer().weight.detach().double()
    assert torch.allclose(vec.erase @ _effective(xp.unet, name).T, vec.guide @ W.T, atol=2e-4)


# ------------------------------------------------------------------------------------------- finetune (ESD)


def test_finetune_objective_and_exact_resume(xp, tmp_path):
    kw = dict(method="finetune", rank=2, lr=1e-2, eta=2.0, batch_size=2, num_samples=2, templates=["a {}"],
              num_inference_steps=2, seed=5, progress=False)
    h0 = _base_hash(xp.unet)
    full = erase(xp, "circle", steps=4, **kw)
    assert [r["step"] for r in full.history] == [0, 1, 2, 3]
    assert all(not p.requires_grad for n, p in xp.unet.named_parameters() if "lora_" in n)
    assert _base_hash(xp.unet) == h0
    # step 0: B = 0, so the trained model equals the frozen one and the loss is (1 + eta)^2 |e_c - e_0|^2
    g = torch.Generator().manual_seed(5 * 1_000_003)
    with full.disabled():
        x0 = xp.generate(["a circle"], seed=5, num_images_per_prompt=2, num_inference_steps=2,
                         output_type="latent", progress=False).images.float()
        idx = torch.randint(2, (2,), generator=g)
        t = torch.randint(1000, (2,), generator=g)
        noise = torch.randn(2, *x0.shape[1:], generator=g)
        x_t = xp.add_noise(x0[idx], noise, t)
        e_c = xp.predict_noise(x_t, t, xp.encode_prompt("a circle"))
        e_0 = xp.predict_noise(x_t, t, xp.encode_prompt(""))
    want = 9.0 * ((e_c - e_0) ** 2).mean().item()
    assert full.history[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    final = {n: (A.clone(), B.clone()) for n, (A, B) in full.factors().items()}
    assert any(B.abs().max() > 0 for _, B in final.values())
    full.remove()

    half = erase(xp, "circle", steps=2, **kw)
    half.save(tmp_path / "half")
    half.remove()
    resumed = erase(xp, "circle", steps=4, resume_from=tmp_path / "half", **kw)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3]
    for n, (A, B) in resumed.factors().items():
        assert torch.allclose(A, final[n][0], atol=1e-6) and torch.allclose(B, final[n][1], atol=1e-6)
    with pytest.raises(ValueError, match="already done 2 steps"):
        erase(xp, "circle", steps=2, resume_from=tmp_path / "half", **kw)


# ------------------------------------------------------------------------------------------- debias


def test_debias_alpha_iteration_and_closed_form(xp):
    calls = []

    def judge(images):  # always sees "red": the gaps never close, alpha grows by step_size * gap per round
        calls.append(len(images))
        return ["red"] * len(images)

    edit = erase(xp, "circle", method="debias", targets={"red": 0.5, "blue": 0.5}, judge=judge, templates=["a {}"],
                 rounds=2, step_size=0.5, num_samples=2, num_inference_steps=2, progress=False)
    assert calls == [2, 2, 2]
    alphas = [h["alpha"] for h in edit.history]
    assert alphas == [{"red": 0.0, "blue": 0.0}, {"red": -0.25, "blue": 0.25}, {"red": -0.5, "blue": 0.5}]
    assert edit.history[0]["shares"] == {"red": 1.0, "blue": 0.0} and not edit.params["converged"]
    # the final adapter is the closed form sending c to c - 0.5 c_red + 0.5 c_blue ("red circle" / "blue circle")
    vec = edit_vectors(xp, ["circle"], templates=["a {}"])
    c_red = xp.encode_prompt("a red circle").embeds[0, 3].double()
    c_blue = xp.encode_prompt("a blue circle").embeds[0, 3].double()
    G = vec.erase - 0.5 * c_red + 0.5 * c_blue
    name = edit.modules[1]
    W = xp.unet.get_submodule(name).get_base_layer().weight.detach().double()
    assert torch.allclose(_effective(xp.unet, name), _lstsq_edit(W, vec.erase, G, vec.preserve, 0.5, 1, 1),
                          atol=1e-5)

    def fair(images):
        return ["red", "blue"] * (len(images) // 2)

    edit2 = erase(xp, "square", method="debias", targets={"red": 0.5, "blue": 0.5}, judge=fair, rounds=5,
                  num_samples=2, num_inference_steps=2, progress=False)
    assert len(edit2.history) == 1 and edit2.params["converged"]
    assert all(B.abs().max() == 0 for _, B in edit2.factors().values())  # alpha = 0: no change
    with pytest.raises(ValueError, match="summing to 1"):
        erase(xp, "circle", method="debias", targets={"red": 0.7, "blue": 0.7}, judge=fair)
    with pytest.raises(ValueError, match="judge"):
        erase(xp, "circle", method="debias", targets={"red": 1.0})
    with pytest.raises(ValueError, match=r"step_decay must be in \(0, 1\], got 1.5"):
        erase(xp, "circle", method="debias", targets={"red": 1.0}, judge=fair, step_decay=1.5)


def test_debias_step_halves_when_the_gap_changes_sign():
    from diffusion_xai.erasure import debias_update

    # one round by hand: red's gap flipped sign (step halves), blue's did not
    alpha, steps = debias_update({"red": -0.5, "blue": 0.5}, {"red": 1.0, "blue": 1.0}, {"red": 0.2, "blue": -0.2},
                                 {"red": -0.3, "blue": -0.1}, 0.5)
    assert steps == {"red": 0.5, "blue": 1.0} and alpha == pytest.approx({"red": -0.4, "blue": 0.3})

    # a linear model whose red share over-reacts (gain 2.5): share_red = 0.8 + 2.5 * (alpha_red - alpha_blue) / 2;
    # a fixed step overshoots further every round, Kesten's rule converges to the 0.5 target
    def run(decay, rounds=40):
        alpha, steps, prev = {"red": 0.0, "blue": 0.0}, {"red": 1.0, "blue": 1.0}, None
        for _ in range(rounds):
            red = min(max(0.8 + 1.25 * (alpha["red"] - alpha["blue"]), 0.0), 1.0)
            gaps = {"red": 0.5 - red, "blue": 0.5 - (1 - red)}
            alpha, steps = debias_update(alpha, steps, gaps, prev, decay)
            prev = gaps
        return abs(gaps["red"])

    assert run(1.0) == pytest.approx(0.5)  # stuck jumping between share 0 and share 1
    assert run(0.5) < 0.01


# ------------------------------------------------------------------------------------------- metrics and CLI


def test_harmonic_h():
    assert harmonic_h(0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert harmonic_h(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_h(0.2, 0.9, 0.4) == pytest.approx(3 / (1 / 0.8 + 1 / 0.9 + 1 / 0.6))
    assert harmonic_h(0.2, 0.9, float("nan")) == pytest.approx(2 / (1 / 0.8 + 1 / 0.9))
    assert harmonic_h(1.0, 0.9, 0.0) == 0.0


def test_cli_writes_a_loadable_lora(tmp_path, capsys):
    from diffusion_xai.erasure_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "no-circle"
    args = parser.parse_args(["erase", "circle", "--preserve", "square,triangle", "--model", "tiny-random",
                              "--templates", "{}|a red {}", "--out", str(out)])
    assert args.func(args) == 0
    assert "erased ['circle']" in capsys.readouterr().out
    xp = XAIPipeline(tiny_pipeline("sd1"), default_steps=2)
    edit = Edit.load(xp, out)
    assert edit.preserve == ["square", "triangle"] and edit.params["templates"] == ["{}", "a red {}"]
    args = parser.parse_args(["erase", "circle", "--model", "tiny-random", "--evaluate", "--out", str(out)])
    with pytest.raises(ValueError, match="needs --model shapesworld"):
        args.func(args)
