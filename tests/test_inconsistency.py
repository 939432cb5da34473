"""D-TIIL inconsistency localisation: the trained ShapesWorld model on a constructed case, and model-free checks
on tiny random pipelines (the user's model is untouched, the embedding is optimised on a copy, bad input,
the blended edit keeps every pixel outside its region, helpers against analytic answers, persistence, CLI)."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_xai import XAIPipeline
from diffusion_xai.inconsistency import (
    InconsistencyResult,
    align_embedding,
    content_words,
    gaussian_blur,
    latent_cells,
    localize_inconsistency,
    region_mask,
    word_scores,
)
from diffusion_xai.shapesworld import MODEL_DIR
from diffusion_xai.shapesworld.scene import build_scene

FAST = dict(align_steps=3, align_batch=1, num_mask_seeds=2, word_samples=2, progress=False)


def _xp(tiny, kind="sd1"):
    return XAIPipeline(tiny(kind), default_steps=3)


def _square_image(size=32):
    img = np.zeros((size, size, 3), np.uint8)
    img[8:20, 10:22] = (220, 40, 40)
    return img


def _unet_state(xp):
    h = hashlib.sha256()
    for k, v in xp.unet.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    params = list(xp.unet.parameters())
    return {"hash": h.hexdigest(), "processors": dict(xp.unet.attn_processors),
            "requires_grad": [p.requires_grad for p in params], "grads": [p.grad is None for p in params],
            "training": xp.unet.training, "hooks": (len(xp.unet._forward_hooks), len(xp.unet._forward_pre_hooks))}


def _assert_same_state(xp, before):
    after = _unet_state(xp)
    assert after["hash"] == before["hash"], "UNet weights changed"
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items()), "processors changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert all(after["grads"]), "gradients were left in the UNet"
    assert after["training"] == before["training"] and after["hooks"] == before["hooks"]


# ------------------------------------------------------------------------------------------- trained model
@pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="the trained ShapesWorld model is missing")
def test_shapesworld_red_circle_called_blue():
    """A red circle captioned "a blue circle": the word is "blue", the region covers the circle, and the
    matching caption scores higher than the wrong one."""
    xp = XAIPipeline.shapesworld()
    scene = build_scene([("circle", "red", "large", "center", True, False)], mention_position=False)
    circle = torch.from_numpy(scene.objects[0].mask)
    kw = dict(progress=False, seed=0)  # the documented defaults
    wrong = localize_inconsistency(xp, scene.image, "a blue circle", **kw)
    assert wrong.words == ["blue", "circle"]
    assert wrong.word == "blue", wrong.word_score_dict()
    assert wrong.inconsistent_words[0] == "blue"
    overlap = (wrong.mask & circle).sum() / circle.sum()
    precision = (wrong.mask & circle).sum() / wrong.mask.sum().clamp_min(1)
    assert overlap > 0.5 and precision > 0.3, (float(overlap), float(precision))
    right = localize_inconsistency(xp, scene.image, "a red circle", **kw)
    assert right.score > wrong.score, (right.score, wrong.score)
    # the decision threshold stored with the model (fitted by benchmarks/inconsistency.py on its tuning split)
    assert wrong.params["threshold_source"] == right.params["threshold_source"] == "calibration"
    assert right.consistent and not wrong.consistent, (right.score, wrong.score, right.threshold)


# ------------------------------------------------------------------------------------------- model untouched
def test_user_unet_and_embeddings_untouched(tiny):
    xp = _xp(tiny)
    text = "a blue circle"
    e0 = xp.encode_prompt(text).embeds.clone()
    before = _unet_state(xp)
    res = localize_inconsistency(xp, _square_image(), text, **FAST)
    _assert_same_state(xp, before)
    assert torch.equal(xp.encode_prompt(text).embeds, e0), "the cached caption embedding was modified"
    assert torch.equal(res.embeddings[0], e0[0])
    assert not torch.equal(res.embeddings[1], e0[0]) and not torch.equal(res.embeddings[2], e0[0])
    assert res.embeddings[1:].requires_grad is False
    # two alignments of 3 steps, 2 x 2 x 2 mask rows, 3 blended steps x 2 (CFG), 2 images x 2 samples x 3 conditions
    assert res.unet_evals == 2 * 3 + 2 * 2 * 2 + 3 * 2 + 2 * 2 * 3


def test_thresholds_stored_with_the_model_apply_to_matching_settings_only(tiny, tmp_path):
    from diffusion_xai.inconsistency import (
        DEFAULT_FINAL_THRESHOLD,
        DEFAULT_THRESHOLD,
        load_thresholds,
        save_thresholds,
    )

    xp = _xp(tiny)
    res = localize_inconsistency(xp, _square_image(), "a blue circle", **FAST)
    assert res.threshold == DEFAULT_THRESHOLD and res.params["final_threshold"] == DEFAULT_FINAL_THRESHOLD
    assert res.params["threshold_source"] == "default"
    path = save_thresholds(tmp_path, FAST["align_steps"], FAST["align_batch"], 1e-3, 0.25, 0.6, pairs=8)
    assert json.loads(path.read_text())["steps3-batch1-lr0.001"]["pairs"] == 8
    old = xp.pipe.config.get("_name_or_path")
    xp.pipe.register_to_config(_name_or_path=str(tmp_path))
    try:
        assert load_thresholds(xp, 3, 1, 1e-3) == {"threshold": 0.25, "final_threshold": 0.6,
                                                    "refine_tolerance": 30.0, "pairs": 8}
        cal = localize_inconsistency(xp, _square_image(), "a blue circle", **FAST)
        assert cal.threshold == 0.25 and cal.params["final_threshold"] == 0.6
        assert cal.params["threshold_source"] == "calibration"
        assert torch.equal(cal.mask, cal.mask_soft >= 0.6) and cal.consistent == (cal.score >= 0.25)
        # the mask threshold was fitted on refined masks: without refinement only the decision threshold holds
        raw = localize_inconsistency(xp, _square_image(), "a blue circle", refine_tolerance=None, **FAST)
        assert raw.threshold == 0.25 and raw.params["final_threshold"] == DEFAULT_FINAL_THRESHOLD
        assert torch.equal(raw.mask_soft, raw.mask_soft_unrefined)
        # other alignment settings were not calibrated: the documented defaults
        other = localize_inconsistency(xp, _square_image(), "a blue circle", **{**FAST, "align_steps": 2})
        assert other.threshold == DEFAULT_THRESHOLD and other.params["threshold_source"] == "default"
        # an explicit argument wins
        arg = localize_inconsistency(xp, _square_image(), "a blue circle", threshold=0.5, **FAST)
        assert arg.threshold == 0.5 and arg.params["threshold_source"] == "argument"
    finally:
        xp.pipe.register_to_config(_name_or_path=old)
    with pytest.raises(ValueError, match="threshold"):
        save_thresholds(tmp_path, 3, 1, 1e-3, 1.5, 0.6)


def test_adam_first_step_moves_every_coordinate_by_lr(tiny):
    """Adam's first update is lr * g / (|g| + 1e-8): every coordinate with a gradient moves by ~lr, none more."""
    xp = _xp(tiny)
    z = xp.encode_image(_square_image())
    start = xp.encode_prompt("a blue circle")
    keep = start.embeds.clone()
    lr = 1e-3
    aligned, losses = align_embedding(xp, z, start, steps=1, lr=lr, seed=0)
    assert torch.equal(start.embeds, keep)
    d = (aligned.embeds - keep).abs()
    assert d.max() <= lr * (1 + 1e-5)
    assert (d > 0.9 * lr).float().mean() > 0.5
    assert losses.shape == (1,) and losses[0] > 0
    # the same seed replays the same samples: identical result
    again, _ = align_embedding(xp, z, start, steps=1, lr=lr, seed=0)
    assert torch.equal(again.embeds, aligned.embeds)


@pytest.mark.parametrize("where", ["generate", "predict_noise"])
def test_user_unet_untouched_after_exception(tiny, monkeypatch, where):
    xp = _xp(tiny)
    before = _unet_state(xp)
    calls = {"n": 0}
    original = getattr(xp, where)
    fail_at = 2 if where == "predict_noise" else 1  # mid-alignment (second step), or the edit

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(xp, where, failing)
    with pytest.raises(RuntimeError, match="boom"):
        localize_inconsistency(xp, _square_image(), "a blue circle", **FAST)
    _assert_same_state(xp, before)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text, match", [
    ("", "non-empty"), ("   ", "non-empty"), ("a the , and", "no content word"), (None, "non-empty")])
def test_bad_caption(tiny, text, match):
    xp = _xp(tiny)
    with pytest.raises(ValueError, match=match):
        localize_inconsistency(xp, _square_image(), text, **FAST)
    assert xp.unet_evals == 0


def test_bad_image_and_parameters(tiny):
    xp = _xp(tiny)
    img = _square_image()
    with pytest.raises(ValueError, match="mode 'RGBA'.*allowed: 'RGB'"):
        localize_inconsistency(xp, Image.fromarray(img).convert("RGBA"), "a red square", **FAST)
    with pytest.raises(ValueError, match="mode 'L'"):
        localize_inconsistency(xp, Image.fromarray(img).convert("L"), "a red square", **FAST)
    with pytest.raises(ValueError, match="image size 33x32 is not allowed; width and height must be multiples of 2"):
        localize_inconsistency(xp, np.zeros((32, 33, 3), np.uint8), "a red square", **FAST)
    with pytest.raises(ValueError, match="uint8"):
        localize_inconsistency(xp, img.astype(np.float32), "a red square", **FAST)
    with pytest.raises(ValueError, match="far above"):
        localize_inconsistency(xp, np.zeros((256, 256, 3), np.uint8), "a red square", **FAST)
    for name in ("mask_threshold", "final_threshold", "threshold", "word_ratio"):
        for bad in (-0.1, 1.5, float("nan"), "0.5"):
            with pytest.raises(ValueError, match=f"{name} must be a number in \\[0, 1\\]"):
                localize_inconsistency(xp, img, "a red square", **{**FAST, name: bad})
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="strength must be in \\(0, 1\\)"):
            localize_inconsistency(xp, img, "a red square", **{**FAST, "strength": bad})
    with pytest.raises(ValueError, match="align_steps must be an integer >= 1, got 0"):
        localize_inconsistency(xp, img, "a red square", **{**FAST, "align_steps": 0})
    for bad in ((0.9, 0.1), (0.0, 1.5), (0.5,)):
        with pytest.raises(ValueError, match="align_t_range must be \\(lo, hi\\)"):
            localize_inconsistency(xp, img, "a red square", **{**FAST, "align_t_range": bad})
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        localize_inconsistency(xp, img, "a red square", **FAST, lr=-1.0)
    with pytest.raises(TypeError, match="inpaint_pipeline"):
        localize_inconsistency(xp, img, "a red square", **FAST, inpaint_pipeline="sd-inpaint")
    for bad in (0, -5.0, 500.0, "30", True):
        with pytest.raises(ValueError, match="refine_tolerance must be None or an RGB distance in \\(0, 442\\]"):
            localize_inconsistency(xp, img, "a red square", **FAST, refine_tolerance=bad)
    with pytest.raises(ValueError, match="word_score must be one of image, contrast, local, got 'both'"):
        localize_inconsistency(xp, img, "a red square", **FAST, word_score="both")
    assert xp.unet_evals == 0, "bad input must be rejected before any UNet evaluation"


def test_content_words():
    assert content_words("a red circle on the left and a blue square") == [
        (1, "red"), (2, "circle"), (5, "left"), (8, "blue"), (9, "square")]
    assert content_words("a circle, and a box!") == [(1, "circle"), (5, "box")]


# ------------------------------------------------------------------------------------------- helpers, known answers
def test_gaussian_blur_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    m = rng.random((20, 24))
    ours = gaussian_blur(torch.from_numpy(m), 2.0).numpy()
    ref = ndimage.gaussian_filter(m, 2.0, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_region_mask_of_a_hot_cell():
    d = torch.zeros(8, 8, dtype=torch.float64)
    d[2, 5] = 3.0  # one hot latent cell -> image pixels rows 16..23, cols 40..47 at scale 8
    soft, binary = region_mask(d, (64, 64), blur_sigma=0.5, threshold=0.3, scale=8)
    assert soft.shape == binary.shape == (64, 64) and soft.dtype == torch.float32
    assert soft.min() == 0 and soft.max() == 1
    ys, xs = np.nonzero(binary.numpy())
    assert abs(ys.mean() - 19.5) < 1.0 and abs(xs.mean() - 43.5) < 1.0  # centred on the cell
    assert binary[19, 43] and not binary[50, 10]
    assert 16 <= binary.sum() <= 400
    # a constant map has no region at all
    soft0, bin0 = region_mask(torch.ones(8, 8), (64, 64), 0.5, 0.3, 8)
    assert soft0.abs().sum() == 0 and not bin0.any()
    # latent cells of a mask: every 8x8 block holding a pixel
    cells = latent_cells(binary, 8)
    assert cells[2, 5] and cells.sum() >= 1
    assert not cells[7, 0]


def test_refine_mask_averages_over_regions_uniform_in_image_and_edit():
    """Two flat squares on a flat background; the edit recolours one square. Regions: background, square A,
    square B (the edit only changes B's colour, which stays uniform). A soft mask that is 1 on half of A and
    on a few background pixels becomes: A = its mean over A, background = its mean over the background."""
    from diffusion_xai.inconsistency import refine_mask

    img = np.full((32, 32, 3), 255, np.uint8)
    img[4:12, 4:12] = (200, 0, 0)  # A
    img[20:28, 18:26] = (0, 0, 200)  # B
    edited = img.copy()
    edited[20:28, 18:26] = (0, 200, 0)
    soft = torch.zeros(32, 32)
    soft[4:8, 4:12] = 1.0  # half of A
    soft[0, 0:4] = 1.0  # 4 background pixels
    out = refine_mask(soft, img, edited, tolerance=30.0)
    a_mean, bg_mean = 0.5, 4 / (32 * 32 - 128)
    expect = torch.full((32, 32), bg_mean)
    expect[4:12, 4:12] = a_mean
    expect[20:28, 18:26] = 0.0
    expect = (expect - expect.min()) / (expect.max() - expect.min())
    torch.testing.assert_close(out, expect.float())
    # a pixel split only in the edit splits the region: recolour one half of B in the edit
    edited[20:24, 18:26] = (255, 255, 0)
    soft2 = torch.zeros(32, 32)
    soft2[20:24, 18:26] = 1.0
    out2 = refine_mask(soft2, img, edited, tolerance=30.0)
    assert out2[20:24, 18:26].eq(1).all() and out2[24:28, 18:26].eq(0).all()
    with pytest.raises(ValueError, match="must be the mask's size"):
        refine_mask(torch.zeros(16, 16), img, edited, 30.0)


def test_word_score_choice(tiny):
    xp = _xp(tiny)
    img = _square_image()
    a = localize_inconsistency(xp, img, "a red circle and a blue box", **FAST, word_score="image")
    b = localize_inconsistency(xp, img, "a red circle and a blue box", **FAST)  # the default
    c = localize_inconsistency(xp, img, "a red circle and a blue box", **FAST, word_score="local")
    assert a.params["word_score"] == "image" and b.params["word_score"] == "contrast"
    assert c.params["word_score"] == "local"
    assert a.word_scores == a.word_scores_image == b.word_scores_image == c.word_scores_image
    assert b.word_scores == b.word_scores_contrast == a.word_scores_contrast
    assert c.word_scores == c.word_scores_local == a.word_scores_local
    assert a.word == a.words[int(np.argmax(a.word_scores_image))]
    assert b.word == b.words[int(np.argmax(b.word_scores_contrast))]
    assert c.word == c.words[int(np.argmax(c.word_scores_local))]
    # local = inside-the-mask bracket minus the same bracket outside it (reference: two direct calls)
    z = xp.encode_image(img)
    weights = F.adaptive_avg_pool2d(c.mask_soft[None, None].double(), tuple(z.shape[-2:]))[0, 0]
    z_edit = xp.encode_image(c.edited_image)
    _, d_in = word_scores(xp, torch.cat([z, z_edit]), c.text, weights, FAST["word_samples"], 3)
    _, d_out = word_scores(xp, torch.cat([z, z_edit]), c.text, 1 - weights, FAST["word_samples"], 3)
    np.testing.assert_allclose(c.word_scores_local, (d_in[0] - d_out[0]).numpy(), rtol=1e-6, atol=1e-9)


def test_word_scores_vanish_between_identical_images(tiny):
    xp = _xp(tiny)
    z = xp.encode_image(_square_image())
    weights = torch.rand(z.shape[-2:], generator=torch.Generator().manual_seed(0))
    words, d = word_scores(xp, torch.cat([z, z]), "a blue circle", weights, num_samples=3, seed=0)
    assert words == [(1, "blue"), (2, "circle")]
    assert d.shape == (2, 2)
    torch.testing.assert_close(d[0], d[1], rtol=0, atol=1e-9)
    assert (d[0] != 0).all()


# ------------------------------------------------------------------------------------------- the edit
def test_blended_edit_keeps_pixels_outside_its_region(tiny):
    xp = _xp(tiny)
    img = _square_image()
    res = localize_inconsistency(xp, img, "a blue circle", **FAST, mask_threshold=0.5)
    assert res.inpainting == "latent-blending"
    f = xp.vae_scale_factor
    region = res.edit_region.numpy()
    # the region is a union of whole latent cells, and covers the thresholded initial mask
    blocks = region.reshape(32 // f, f, 32 // f, f)
    assert (blocks.all((1, 3)) == blocks.any((1, 3))).all()
    assert region[(res.initial_mask_soft >= 0.5).numpy()].all()
    assert 0 < region.sum() < region.size
    edited = np.asarray(res.edited_image)
    assert np.array_equal(edited[~region], img[~region])
    assert not np.array_equal(edited[region], img[region])


def test_user_inpainting_pipeline(tiny):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    base = tiny("sd1")
    xp = _xp(tiny)
    torch.manual_seed(0)
    unet9 = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9}).eval()
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet9, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    before = _unet_state(xp)
    img = _square_image()
    res = localize_inconsistency(xp, img, "a blue circle", **FAST, inpaint_pipeline=pipe)
    _assert_same_state(xp, before)
    assert res.inpainting == "StableDiffusionInpaintPipeline"
    region = res.edit_region.numpy()
    assert np.array_equal(np.asarray(res.edited_image)[~region], img[~region])


# ------------------------------------------------------------------------------------------- result, CLI
def test_result_roundtrip_and_plot(tiny, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    xp = _xp(tiny)
    res = localize_inconsistency(xp, _square_image(), "a red circle and a blue box", **FAST, threshold=1.0)
    assert not res.consistent  # a score of 1.0 needs an alignment that did not move at all
    assert res.words == ["red", "circle", "blue", "box"] and len(res.word_scores) == 4
    assert res.word == res.words[int(np.argmax(res.word_scores))]
    assert res.mask.dtype == torch.bool and res.mask.shape == (32, 32)
    assert torch.equal(res.mask, res.mask_soft >= res.params["final_threshold"])
    assert 0.0 <= res.score <= 1.0
    d = res.to_dict()
    json.dumps(d)
    assert d["consistent"] is False and d["unet_evals"] == res.unet_evals
    res.save(tmp_path / "r")
    back = InconsistencyResult.load(tmp_path / "r")
    assert torch.equal(back.mask, res.mask) and torch.equal(back.mask_soft, res.mask_soft)
    assert torch.equal(back.embeddings, res.embeddings)
    assert back.to_dict() == json.loads(json.dumps(d))
    assert np.array_equal(np.asarray(back.edited_image), np.asarray(res.edited_image))
    fig = res.plot()
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="not 'inconsistency'"):
        from diffusion_xai.results import save_result

        save_result(tmp_path / "other", {"x": torch.zeros(1)}, {}, kind="heatmaps")
        InconsistencyResult.load(tmp_path / "other")


def test_cli_localize(tmp_path, capsys):
    from diffusion_xai.inconsistency_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    Image.fromarray(_square_image()).save(tmp_path / "in.png")
    out = tmp_path / "out"
    a = parser.parse_args(["localize", str(tmp_path / "in.png"), "a blue circle", "--model", "tiny-random",
                           "--align-steps", "2", "--mask-seeds", "2", "--word-samples", "2", "--steps", "2",
                           "--out", str(out), "--no-progress", "--word-score", "contrast", "--refine-tolerance", "0"])
    assert a.func(a) == 0
    summary = json.loads((out / "localize.json").read_text())
    assert summary["words"] == ["blue", "circle"] and summary["params"]["align_steps"] == 2
    assert summary["params"]["word_score"] == "contrast" and summary["params"]["refine_tolerance"] is None
    assert summary["word_scores"] == summary["word_scores_contrast"]
    for f in summary["files"].values():
        assert Image.open(f).size[0] > 0
    assert Image.open(out / "mask.png").size == (32, 32)
    assert "UNet evals" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        a = parser.parse_args(["localize", str(tmp_path / "missing.png"), "a blue circle", "--out", str(out)])
        a.func(a)
