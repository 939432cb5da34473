"""ShapesWorld: deterministic scenes, exact masks, word maps, biases, oracle, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusion_xai.shapesworld import scene as sw
from diffusion_xai.shapesworld.oracle import degrade, judge, same_objects


def test_scene_is_deterministic_per_seed():
    a, b = sw.sample_scene(123), sw.sample_scene(123)
    assert a.caption == b.caption
    assert np.array_equal(a.image, b.image)
    assert any(sw.sample_scene(s).caption != a.caption for s in range(124, 130))


@pytest.mark.parametrize("seed", range(40))
def test_masks_match_rendered_pixels_exactly(seed):
    s = sw.sample_scene(seed)
    fg = np.zeros(s.image.shape[:2], bool)
    for o in s.objects:
        assert o.mask.any()
        assert (s.image[o.mask] == np.array(sw.COLORS[o.color], np.uint8)).all()
        assert not (fg & o.mask).any(), "objects must not overlap"
        fg |= o.mask
    assert (s.image[~fg] == np.array(sw.BACKGROUND, np.uint8)).all()


@pytest.mark.parametrize("seed", range(40))
def test_every_caption_word_has_a_region_or_is_a_function_word(seed):
    s = sw.sample_scene(seed)
    assert s.caption.replace(",", "").split() == s.words
    for word, owner, role in zip(s.words, s.word_objects, s.word_roles):
        if owner is None:
            assert role == "function" and word in sw.FUNCTION_WORDS
            continue
        obj = s.objects[owner]
        canon = sw.canonical(word)
        assert getattr(obj, role) == canon, (word, role, obj.describe())


def test_word_mask_and_errors():
    s = sw.build_scene([("circle", "red", "large", "left", True, True),
                        ("square", "blue", "small", "right", True, False)], mention_position=True)
    assert s.caption == "a large red circle on the left and a blue square on the right"
    assert np.array_equal(s.word_mask("red"), s.objects[0].mask)
    assert np.array_equal(s.word_mask("right"), s.objects[1].mask)
    with pytest.raises(ValueError, match="'dog' .* is not in caption"):
        s.word_mask("dog")
    with pytest.raises(ValueError, match="function word"):
        s.word_mask("and")


def test_injected_biases_are_what_the_generator_draws():
    counts = {"red": 0, "n": 0}
    sizes = {"large": 0, "n": 0}
    for seed in range(6000):
        s = sw.sample_scene(seed, num_objects=1)
        o = s.objects[0]
        if o.shape == "circle" and "color" not in s.word_roles:
            counts["n"] += 1
            counts["red"] += o.color == "red"
        if o.shape == "square" and "size" not in s.word_roles:
            sizes["n"] += 1
            sizes["large"] += o.size == "large"
    p_red = sw.BIASES[("circle", "color")]["red"]
    p_large = sw.BIASES[("square", "size")]["large"]
    for hits, n, p in ((counts["red"], counts["n"], p_red), (sizes["large"], sizes["n"], p_large)):
        assert n > 150
        assert abs(hits / n - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert sw.CONTROL_SHAPE not in {shape for shape, _ in sw.BIASES}
    assert sw.attribute_distribution("cross", "color") == {c: 1 / 6 for c in sw.COLORS}


def test_scene_from_prompt_parses_the_grammar():
    s = sw.scene_from_prompt("a red circle and a big blue box", seed=3)
    assert [(o.shape, o.color) for o in s.objects] == [("circle", "red"), ("square", "blue")]
    assert s.objects[1].size == "large"
    with pytest.raises(ValueError, match="unknown words"):
        sw.scene_from_prompt("a red dog")


def test_oracle_is_exact_on_clean_renders():
    n = 300
    ok = sum(same_objects(judge(s.image), s.objects) for s in map(sw.sample_scene, range(10_000, 10_000 + n)))
    assert ok / n >= 0.99


def test_oracle_on_degraded_renders():
    rng = np.random.default_rng(0)
    n = 200
    ok = sum(same_objects(judge(degrade(s.image, rng)), s.objects)
             for s in map(sw.sample_scene, range(20_000, 20_000 + n)))
    assert ok / n >= 0.95


@pytest.mark.parametrize("shape", sw.SHAPES)
@pytest.mark.parametrize("sigma", [0.0, 1.0, 1.4])
def test_oracle_reads_small_soft_shapes(shape, sigma):
    # decoded samples round the corners of small shapes: a small disc blurred (then re-quantised by the
    # decoder) must still be a circle, and a small blurred square still a square
    obj = sw.ShapeObject(shape, "red", "small", "center", (32, 32),
                         sw.shape_mask(shape, (32, 32), sw.SIZE_RADIUS["small"]))
    img = sw.render([obj]).astype(np.float32)
    if sigma:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    found = judge(img.round().astype(np.uint8))
    assert [(o.shape, o.size, o.position) for o in found] == [(shape, "small", "center")]


def test_oracle_separates_touching_objects_of_different_colours():
    sq = sw.shape_mask("square", (26, 32), 7)
    ci = sw.shape_mask("circle", (39, 32), 7) & ~sq
    assert (ndimage.binary_dilation(sq) & ci).any()  # they touch: one foreground region
    img = sw.render([sw.ShapeObject("square", "red", "small", "center", (26, 32), sq),
                     sw.ShapeObject("circle", "blue", "small", "center", (39, 32), ci)])
    assert [(o.shape, o.color) for o in judge(img)] == [("square", "red"), ("circle", "blue")]
    # the same outline in one colour is one object (no split without a colour boundary)
    one = sw.render([sw.ShapeObject("square", "red", "small", "center", (26, 32), sq | ci)])
    assert len(judge(one)) == 1


def test_oracle_rejects_bad_images():
    with pytest.raises(ValueError, match="64x64"):
        judge(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        judge(np.zeros((64, 64, 3), np.float32))


def test_tokenizer_has_every_world_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from diffusion_xai.shapesworld.vocab import write_tokenizer_files

    tok = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path))
    for w in sw.vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    # words outside the world still tokenise, into pieces
    assert len(tok("giraffe", add_special_tokens=False).input_ids) > 1
    assert tok("a red circle", padding="max_length", max_length=77).input_ids.__len__() == 77


def test_training_script_reduces_the_loss(tmp_path):
    from diffusion_xai.shapesworld import train

    torch.manual_seed(0)
    tok_dir = train.write_tokenizer_files(tmp_path / "tokenizer")
    tok, vae, unet, text = train._models(True, tok_dir)
    vae_losses = train.train_vae(vae, tmp_path, steps=60, batch=8, lr=3e-3, log_every=1000, ckpt_every=30)
    assert np.mean(vae_losses[-10:]) < 0.7 * np.mean(vae_losses[:5])
    assert json.loads((tmp_path / "vae_ckpt" / "state.json").read_text())["step"] == 60
    train.encode_latents(vae, tmp_path, num=64, batch=32)
    losses = train.train_unet(unet, text, tok, tmp_path, steps=80, scaling=1.0, batch=16, lr=2e-3,
                              log_every=1000, ckpt_every=40)
    assert np.mean(losses[-15:]) < np.mean(losses[:5])
    # resumable: a second call continues from the checkpoint and does nothing more
    assert train.train_unet(unet, text, tok, tmp_path, steps=80, scaling=1.0, batch=16) == []


def test_finetune_stage_continues_an_exported_model(tmp_path):
    from safetensors.torch import load_file

    from diffusion_xai.shapesworld import train

    torch.manual_seed(0)
    tok_dir = train.write_tokenizer_files(tmp_path / "tokenizer")
    tok, vae, unet, text = train._models(True, tok_dir)
    train.train_vae(vae, tmp_path, steps=4, batch=4, log_every=1000)
    train.encode_latents(vae, tmp_path, num=16, batch=16)
    train.train_unet(unet, text, tok, tmp_path, steps=4, scaling=1.0, batch=4, log_every=1000)
    (tmp_path / "state.json").write_text(json.dumps({"scaling_factor": 1.0}))
    init = train.export(tmp_path, tmp_path / "model", tiny=True)

    ft = tmp_path / "ft"
    rec = train.finetune(init, ft, tmp_path / "out", steps=8, stop_at=6, num_latents=24, objects={2: 0.5, 3: 0.5},
                         batch=4, ckpt_every=4, decoder_steps=3, vae_check=4)
    assert rec["finetune"]["steps_done"] == 6 and rec["finetune"]["decoder_steps"] == 3
    # the requested object counts: every caption has one article per object, no single objects
    counts = [c.split().count("a") for c in json.loads((ft / "captions.json").read_text())]
    assert set(counts) == {2, 3}
    # the VAE encoder is untouched (so are the cached latents), the decoder, UNet and text encoder moved
    enc = load_file(str(init / "vae" / "diffusion_pytorch_model.safetensors"))
    enc2 = load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(enc[k], enc2[k]) for k in enc if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(enc[k], enc2[k]) for k in enc if k.startswith("decoder."))
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(init / part)), load_file(str(tmp_path / "out" / part))
        assert not all(torch.equal(a[k], b[k]) for k in a), part
    assert json.loads((tmp_path / "out" / "training.json").read_text())["finetune"]["objects"] == {"2": 0.5, "3": 0.5}
    # resumable: the stopped run continues to the end of its schedule
    assert train.finetune(init, ft, tmp_path / "out", steps=8, stop_at=None, num_latents=24, objects={2: 0.5, 3: 0.5},
                          batch=4, decoder_steps=3, vae_check=4)["finetune"]["steps_done"] == 8
    # a fine-tune of a fine-tuned model keeps the earlier stage on record, oldest first
    first = json.loads((tmp_path / "out" / "training.json").read_text())["finetune"]
    rec2 = train.finetune(tmp_path / "out", tmp_path / "ft2", tmp_path / "out2", steps=0, decoder_steps=2, vae_check=4)
    assert rec2["finetunes"] == [first, rec2["finetune"]] and rec2["finetune"]["decoder_steps"] == 2
    with pytest.raises(ValueError, match="objects"):
        train.finetune(init, ft, tmp_path / "out", objects={2: 0.5, 4: 0.5})
    with pytest.raises(ValueError, match="-1"):
        train.finetune(init, ft, tmp_path / "out", steps=-1)


def test_finetune_cli_rejects_bad_object_shares(capsys):
    from diffusion_xai.shapesworld import train

    for bad in ("0.5,0.5", "a,b,c"):
        with pytest.raises(SystemExit):
            train.main(["--stage", "finetune", "--finetune-objects", bad])
        assert "--finetune-objects must be three comma-separated shares" in capsys.readouterr().err


def test_recipe_trains_every_part_in_order_and_resumes(tmp_path):
    from safetensors.torch import load_file

    from diffusion_xai.shapesworld import train

    torch.manual_seed(0)
    recipe = dict(train.RECIPE, base=dict(vae_steps=4, num_latents=16, unet_steps=4, decoder_steps=2),
                  grounded=[dict(steps=3, lr=1e-4, pixel_min_objects=1), dict(steps=2, lr=2e-4, pixel_min_objects=2)],
                  num_latents=12, decoder_steps=2, batch=4, vae_check=4)
    work, out = tmp_path / "work", tmp_path / "out"
    rec = train.train_recipe(work, out, recipe, tiny=True)
    # the stages of the record are the recipe's, oldest first: the grounded parts, then the decoder
    hist = train.finetune_history(rec)
    assert [(h["steps_done"], h["lr"], h["pixel_min_objects"]) for h in hist[:2]] == [(3, 1e-4, 1), (2, 2e-4, 2)]
    assert all(h["grounding"] == recipe["grounding"] for h in hist[:2])
    assert hist[2]["steps_done"] == 0 and hist[2]["decoder_steps"] == 2 and len(hist) == 3
    assert rec["unet_steps_done"] == 4 and rec["decoder_steps"] == 2  # the base part, with its decoder
    assert set(rec["recipe"]["parts_seconds"]) == {"base", "grounded1", "grounded2", "decoder"}
    assert rec["recipe"]["seconds"] == pytest.approx(sum(rec["recipe"]["parts_seconds"].values()))
    assert train.training_seconds(rec) == rec["recipe"]["seconds"]
    stages = {k: v for k, v in rec.items() if k != "recipe"}  # an older record: the sum of its stages
    assert train.training_seconds(stages) == pytest.approx(
        rec["vae_seconds"] + rec["decoder_seconds"] + rec["unet_seconds"]
        + sum(h.get("seconds", 0) + (h.get("decoder_seconds") or 0) for h in hist))
    # the grounded parts trained on one cache of scenes
    assert (work / "grounded1" / "captions.json").read_text() == (work / "grounded2" / "captions.json").read_text()
    # the output's UNet is the last grounded part's, its VAE encoder the base model's, its decoder new
    last = load_file(str(work / "model_grounded2" / "unet" / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(last[k], got[k]) for k in last)
    v0 = load_file(str(work / "model_base" / "vae" / "diffusion_pytorch_model.safetensors"))
    v1 = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v0[k], v1[k]) for k in v0 if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(v0[k], v1[k]) for k in v0 if k.startswith("decoder."))
    # a rerun skips every finished part and keeps their times
    again = train.train_recipe(work, out, recipe, tiny=True)
    assert again["recipe"]["parts_seconds"] == rec["recipe"]["parts_seconds"]
