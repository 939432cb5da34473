"""Token grounding for fine-tuning: targets from the world's ground truth, the loss, the attention tap."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_xai.shapesworld import sample_scene, train
from diffusion_xai.shapesworld.grounding import (
    AttentionTap,
    grounding_loss,
    object_masks,
    pixel_grounding_loss,
    token_owners,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok_dir = train.write_tokenizer_files(path / "tokenizer")
    return train._models(True, tok_dir)


@pytest.mark.parametrize("seed", range(12))
def test_token_owners_follow_the_caption_words(tiny, seed):
    tok = tiny[0]
    sc = sample_scene(seed, 1 + seed % 3)
    owners = token_owners(sc, tok)
    tokens = tok.convert_ids_to_tokens(tok(sc.caption).input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    words = iter(zip(sc.words, sc.word_objects))
    for i, t in enumerate(tokens[1:-1], start=1):
        text = t.replace("</w>", "")
        if text == ",":
            assert owners[i] == -1
            continue
        word, owner = next(words)
        assert text == word
        assert owners[i] == (-1 if owner is None else owner)
    assert (owners[len(tokens) - 1:] == -1).all() and owners[0] == -1


@pytest.mark.parametrize("res", [8, 4])
def test_object_masks_are_area_fractions(res):
    sc = sample_scene(3, 2)
    m = object_masks(sc, res)
    cell = (64 // res) ** 2
    for i, obj in enumerate(sc.objects):
        assert m[i].sum() * cell == pytest.approx(obj.mask.sum(), rel=1e-5)
        # a cell is full exactly where every pixel of it belongs to the object
        full = obj.mask.reshape(res, 64 // res, res, 64 // res).all(axis=(1, 3))
        assert np.array_equal(m[i] == 1.0, full)
    assert (m[len(sc.objects):] == 0).all()


def test_grounding_loss_known_answers():
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, :4, :4] = 1.0  # object 0: the top-left quarter
    owners = torch.full((1, 5), -1)
    owners[0, 2] = 0
    on_object = torch.zeros(1, 1, 16, 5)
    on_object[0, 0, 0, 2] = 1.0  # token 2 attended only from a cell inside its object (4x4 layer)
    assert grounding_loss({"l": on_object}, owners, masks).item() == pytest.approx(0.0, abs=1e-7)
    uniform = torch.full((1, 2, 16, 5), 0.2)  # every position spreads attention evenly: share 4/16
    assert grounding_loss({"l": uniform}, owners, masks).item() == pytest.approx(0.75 ** 2)
    # an 8x8 layer uses the masks as they are; layers are averaged
    fine = torch.full((1, 1, 64, 5), 0.2)
    both = grounding_loss({"a": on_object, "b": fine}, owners, masks).item()
    assert both == pytest.approx((0.0 + 0.75 ** 2) / 2)
    # dropped captions and captions without grounded words add nothing
    assert grounding_loss({"l": uniform}, owners, masks, valid=torch.tensor([False])).item() == 0.0
    assert grounding_loss({"l": uniform}, torch.full((1, 5), -1), masks).item() == 0.0
    # its gradient moves attention logits towards the object
    logits = torch.zeros(1, 1, 16, 5, requires_grad=True)
    grounding_loss({"l": logits.softmax(-1)}, owners, masks).backward()
    g = logits.grad[0, 0, :, 2].view(4, 4)
    assert (g[:2, :2] < 0).all() and (g[2:, :] > 0).all()


def test_pixel_grounding_loss_known_answers():
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, :4, :4] = 1.0  # object 0: the top-left quarter
    masks[0, 1, 6:, 6:] = 0.5  # object 1: half of each of four cells
    owners = torch.tensor([[-1, 0, 0, 1, -1]])
    uniform = torch.full((1, 1, 64, 5), 0.2)  # own mass 0.4 for object 0, 0.2 for object 1
    want = (16 * 0.6 ** 2 + 4 * 0.5 * 0.8 ** 2) / (16 + 4 * 0.5)
    assert pixel_grounding_loss({"l": uniform}, owners, masks).item() == pytest.approx(want)
    # inside each object every position reads only its object's words: zero, whatever the background does
    a = torch.zeros(1, 1, 8, 8, 5)
    a[..., 4] = 1.0  # background: a padding token
    a[0, 0, :4, :4] = torch.tensor([0.0, 0.3, 0.7, 0.0, 0.0])
    a[0, 0, 6:, 6:] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    assert pixel_grounding_loss({"l": a.view(1, 1, 64, 5)}, owners, masks).item() == pytest.approx(0.0, abs=1e-7)
    assert pixel_grounding_loss({"l": uniform}, owners, masks, valid=torch.tensor([False])).item() == 0.0


def test_attention_tap_keeps_outputs_passes_gradients_and_restores(tiny):
    tok, _, unet, text = tiny
    unet = copy.deepcopy(unet)
    before = dict(unet.attn_processors)
    ids = tok(["a red circle and a blue square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    emb = text(ids)[0]
    ref = unet(x, t, encoder_hidden_states=emb).sample
    tap = AttentionTap()
    with tap.installed(unet):
        out = unet(x, t, encoder_hidden_states=emb).sample
        sides = sorted({int(round(p.shape[2] ** 0.5)) for p in tap.probs.values()})
        assert sides == [4, 8] and all(k.endswith("attn2") for k in tap.probs)
        masks = torch.from_numpy(object_masks(sample_scene(0, 1), 8))[None]
        owners = torch.from_numpy(token_owners(sample_scene(0, 1), tok)).long()[None]
        grounding_loss(tap.probs, owners, masks).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(unet.attn_processors[k] is before[k] for k in before)
    grads = [m.to_k.weight.grad for n, m in unet.named_modules() if n.endswith("attn2")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_grounded_training_puts_word_attention_on_the_object(tmp_path, tiny):
    """Same data, seeds and steps: with the grounding term the tokens' attention sits inside their objects."""
    tok, vae, unet0, text0 = tiny
    torch.manual_seed(0)
    train.encode_latents(vae, tmp_path, num=32, batch=32, seed0=500, num_objects_prob={2: 1.0})
    with pytest.raises(FileNotFoundError, match="grounding.safetensors"):
        train.train_unet(copy.deepcopy(unet0), copy.deepcopy(text0), tok, tmp_path, steps=1, scaling=1.0,
                         grounding=1.0)
    train.encode_grounding(tok, tmp_path, 32, seed0=500, num_objects_prob={2: 1.0})
    g = load_file(str(tmp_path / "grounding.safetensors"))
    assert g["owners"].shape == (32, 77) and g["masks"].shape == (32, 3, 8, 8)
    owned = [sum(o is not None for o in sample_scene(500 + j, 2).word_objects) for j in range(32)]
    assert (g["owners"] >= 0).sum(1).tolist() == owned  # every describing word grounded, nothing else

    ids = tok(__import__("json").loads((tmp_path / "captions.json").read_text()), padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    x = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def held_loss(unet, text):
        tap = AttentionTap()
        with torch.no_grad(), tap.installed(unet):
            unet(x, torch.full((32,), 300), encoder_hidden_states=text(ids)[0])
            return grounding_loss(tap.probs, g["owners"].long(), g["masks"].float()).item()

    results = {}
    for weight in (0.0, 1.0):
        unet, text = copy.deepcopy(unet0), copy.deepcopy(text0)
        work = tmp_path / f"w{weight}"
        work.mkdir()
        for f in ("latents.safetensors", "captions.json", "grounding.safetensors"):
            (work / f).write_bytes((tmp_path / f).read_bytes())
        train.train_unet(unet, text, tok, work, steps=100, scaling=1.0, batch=8, lr=5e-3, log_every=1000,
                         warmup=1, grounding=weight)
        results[weight] = held_loss(unet, text)
    assert results[1.0] < 0.85 * results[0.0]
    with pytest.raises(ValueError, match="-0.5"):
        train.train_unet(unet, text, tok, tmp_path, steps=1, scaling=1.0, grounding=-0.5)
    with pytest.raises(ValueError, match="-1"):
        train.train_unet(unet, text, tok, tmp_path, steps=1, scaling=1.0, grounding=1.0, grounding_pixel=-1)
    with pytest.raises(ValueError, match="pixel_min_objects"):
        train.train_unet(unet, text, tok, tmp_path, steps=1, scaling=1.0, grounding=1.0, pixel_min_objects=4)

    # the pixel term only on scenes of >= 3 objects: on these two-object scenes it adds nothing, so
    # training is the same as without it, step for step; on >= 2 objects it is not
    runs = {}
    for name, kw in {"none": {}, "min3": dict(grounding_pixel=5.0, pixel_min_objects=3),
                     "min2": dict(grounding_pixel=5.0, pixel_min_objects=2)}.items():
        work = tmp_path / f"px_{name}"
        work.mkdir()
        for f in ("latents.safetensors", "captions.json", "grounding.safetensors"):
            (work / f).write_bytes((tmp_path / f).read_bytes())
        unet, text = copy.deepcopy(unet0), copy.deepcopy(text0)
        train.train_unet(unet, text, tok, work, steps=3, scaling=1.0, batch=4, log_every=1000, grounding=1.0, **kw)
        runs[name] = unet.state_dict()
    assert all(torch.equal(runs["none"][k], runs["min3"][k]) for k in runs["none"])
    assert not all(torch.equal(runs["none"][k], runs["min2"][k]) for k in runs["none"])
