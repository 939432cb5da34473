"""The shipped ShapesWorld model: loads offline, draws what it is asked, and its heatmaps localise."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_xai import XAIPipeline
from diffusion_xai.shapesworld import MODEL_DIR, judge

PROMPTS = ["a red circle", "a blue square on the left", "a large green triangle", "a yellow cross on the top"]


@pytest.fixture(scope="module")
def xp(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return XAIPipeline.shapesworld()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_shipped_weights_are_small_safetensors():
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_generates_what_the_prompt_says(xp):
    images = xp.generate(PROMPTS, seed=0, output_type="np", progress=False).images
    assert images.shape == (4, 64, 64, 3)
    for prompt, im in zip(PROMPTS, images):
        objs = judge((im * 255).round().astype(np.uint8))
        assert len(objs) == 1, (prompt, [o.describe() for o in objs])
        o = objs[0].describe()
        for word in prompt.split():
            if word in ("red", "blue", "green", "yellow"):
                assert o["color"] == word, (prompt, o)
            if word in ("circle", "square", "triangle", "cross"):
                assert o["shape"] == word, (prompt, o)
            if word in ("left", "top"):
                assert o["position"] == word, (prompt, o)
            if word == "large":
                assert o["size"] == "large", (prompt, o)


def test_heatmaps_point_at_the_right_object(xp):
    prompt = "a red circle on the left and a blue square on the right"
    res = xp.heatmaps(prompt, seed=0, progress=False)
    objs = {o.shape: o for o in judge(np.asarray(res.images[0]))}
    assert {"circle", "square"} <= set(objs)
    for word, own, other in (("circle", "circle", "square"), ("square", "square", "circle"),
                             ("red", "circle", "square"), ("blue", "square", "circle")):
        m = res.image_map(word)
        inside_own = m[objs[own].mask].mean()
        inside_other = m[objs[other].mask].mean()
        assert inside_own > inside_other, (word, inside_own, inside_other)
