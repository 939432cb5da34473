"""Train the embedded ShapesWorld Stable Diffusion from scratch.

    python -m diffusion_xai.shapesworld.train --work runs/shapesworld [--out DIR] [--threads 2]

runs the shipped model's whole recipe (:data:`RECIPE`, :func:`train_recipe`; about 2 hours on this
2-core CPU): a base model (stages 1-4 below, ``--stage all`` runs them alone), three token-grounded
fine-tunes of its UNet + text encoder and a fine-tune of its decoder (stage 5).

Stages (each resumable from its checkpoint in ``--work``):
1. ``vae``: an AutoencoderKL (64x64x3 -> 8x8x4) with a foreground-weighted MSE loss (the black
   background would otherwise dominate and colours collapse), checked by the oracle.
2. ``latents``: encode a fixed, seeded set of scenes once (posterior mean x scaling factor).
3. ``unet``: UNet and CLIP text encoder trained jointly on the epsilon objective with caption
   dropout (for classifier-free guidance) and an EMA of the weights.
4. ``export``: a diffusers ``StableDiffusionPipeline`` saved as safetensors (default:
   into the package, where :func:`load_shapesworld_pipeline` finds it).
5. ``finetune`` (``--stage finetune``): continue training an exported model, on fresh scenes with
   more of them holding two or three objects: its decoder (encoder frozen) and, on request, its
   UNet + text encoder (:data:`FINETUNE`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .scene import IMAGE_SIZE, NUM_OBJECTS_PROB, sample_scene
from .vocab import write_tokenizer_files

PACKAGE_MODEL_DIR = Path(__file__).parent / "model"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 64, 64], layers_per_block=1, latent_channels=4,
    norm_num_groups=16, sample_size=IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[48, 96, 128], layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=4, norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
TINY = dict(  # for tests of this script
    vae=dict(block_out_channels=[8, 8, 8, 8], norm_num_groups=4),
    unet=dict(block_out_channels=[16, 16, 16], norm_num_groups=8, attention_head_dim=2),
    text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16),
)


def draw_object_counts(rng: np.random.Generator, prob: dict[int, float], size: int) -> np.ndarray:
    """``size`` object counts drawn from ``{count: probability}``."""
    ks = sorted(prob)
    return rng.choice(ks, size=size, p=[prob[k] for k in ks])


def scene_batch(seeds, num_objects=None) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (B, 3, 64, 64) and captions for the given scene seeds (and object counts)."""
    counts = [None] * len(seeds) if num_objects is None else num_objects
    scenes = [sample_scene(int(s), None if k is None else int(k)) for s, k in zip(seeds, counts)]
    img = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(img).permute(0, 3, 1, 2).contiguous(), [s.caption for s in scenes]


def _models(tiny: bool, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vae_cfg, unet_cfg, text_cfg = dict(VAE_CONFIG), dict(UNET_CONFIG), dict(TEXT_CONFIG)
    if tiny:
        vae_cfg.update(TINY["vae"])
        unet_cfg.update(TINY["unet"])
        text_cfg.update(TINY["text"])
        unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"]
    text_cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_cfg)
    unet = UNet2DConditionModel(**unet_cfg)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return tok, vae, unet, text


def _save_ckpt(path: Path, modules: dict, opt: torch.optim.Optimizer, step: int, extra: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    for name, m in modules.items():
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path / f"{name}.safetensors"))
    torch.save(opt.state_dict(), path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))


def _load_ckpt(path: Path, modules: dict, opt: torch.optim.Optimizer) -> dict:
    for name, m in modules.items():
        m.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def train_vae(vae, work: Path, steps: int, batch: int = 16, lr: float = 1e-3, fg_weight: float = 8.0,
              kl_weight: float = 1e-6, log_every: int = 100, ckpt_every: int = 500) -> list[float]:
    """Foreground-weighted MSE + tiny KL; returns the loss history of this call."""
    ckpt = work / "vae_ckpt"
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = _load_ckpt(ckpt, {"vae": vae}, opt)["step"] if (ckpt / "state.json").exists() else 0
    rng = np.random.default_rng(1234 + start)
    losses = []
    vae.train()
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:  # cosine decay
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        x, _ = scene_batch(rng.integers(10**8, 2 * 10**8, batch))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        fg = (x.abs().sum(1, keepdim=True) < 2.99).float()  # background is (-1, -1, -1)
        w = 1.0 + (fg_weight - 1.0) * fg
        loss = (w * (rec - x) ** 2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step + 1)
    vae.eval()
    return losses


def finetune_decoder(vae, work: Path, steps: int, batch: int = 16, lr: float = 5e-4, fg_weight: float = 8.0,
                     log_every: int = 100, ckpt_every: int = 250,
                     num_objects_prob: dict[int, float] | None = None) -> list[float]:
    """Sharpen the decoder with the encoder frozen: the latents (and so the UNet's data) stay the same.

    Decodes the posterior *mean* (what the UNet learns to produce); loss = foreground-weighted
    L1 + MSE. With ``num_objects_prob`` the scenes' object counts follow that distribution
    (the crowded three-object scenes are where reconstructions fail). Resumable from
    ``work/decoder_ckpt``.
    """
    ckpt = work / "decoder_ckpt"
    for p in vae.parameters():
        p.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    st = _load_ckpt(ckpt, {"vae": vae}, opt) if (ckpt / "state.json").exists() else {}
    start, seconds0, t0 = st.get("step", 0), st.get("seconds", 0.0), time.time()
    rng = np.random.default_rng(4321 + start)
    losses = []
    bar = tqdm(range(start, steps), desc="decoder", initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        seeds = rng.integers(2 * 10**8, 3 * 10**8, batch)
        x, _ = scene_batch(seeds, None if num_objects_prob is None else draw_object_counts(rng, num_objects_prob, batch))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        fg = (x.abs().sum(1, keepdim=True) < 2.99).float()
        w = 1.0 + (fg_weight - 1.0) * fg
        loss = (w * ((rec - x).abs() + (rec - x) ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _save_ckpt(ckpt, {"vae": vae}, opt, step + 1, {"seconds": seconds0 + time.time() - t0})
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()
    return losses


def load_trained_vae(vae, work: Path):
    """The VAE weights of ``work``: the sharpened decoder's when present."""
    src = work / "decoder_ckpt" if (work / "decoder_ckpt" / "vae.safetensors").exists() else work / "vae_ckpt"
    vae.load_state_dict(load_file(str(src / "vae.safetensors")))
    return vae.eval()


@torch.no_grad()
def vae_oracle_agreement(vae, n: int = 200, seed0: int = 3 * 10**8) -> float:
    """Share of scenes whose VAE reconstruction the oracle judges exactly like the original."""
    from .oracle import judge, same_objects

    agree = 0
    for i in range(0, n, 50):
        seeds = list(range(seed0 + i, seed0 + min(n, i + 50)))
        x, _ = scene_batch(seeds)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for s, im in zip(seeds, imgs):
            agree += same_objects(judge(im), sample_scene(s).objects)
    return agree / n


@torch.no_grad()
def encode_latents(vae, work: Path, num: int, batch: int = 256, seed0: int = 0,
                   num_objects_prob: dict[int, float] | None = None) -> None:
    """Encode ``num`` seeded scenes once; stores latents (unscaled posterior means) and captions.

    Scene ``j`` has seed ``seed0 + j``; with ``num_objects_prob`` its object count is drawn from
    that distribution (seeded) instead of the world's own."""
    path = work / "latents.safetensors"
    if path.exists() and load_file(str(path))["latents"].shape[0] == num:
        return
    counts = _latent_counts(num, num_objects_prob)
    lat, caps = [], []
    for i in tqdm(range(0, num, batch), desc="latents"):
        j = min(num, i + batch)
        x, c = scene_batch(range(seed0 + i, seed0 + j), None if counts is None else counts[i:j])
        lat.append(vae.encode(x).latent_dist.mean)
        caps += c
    lat = torch.cat(lat)
    save_file({"latents": lat.contiguous()}, str(path))
    (work / "captions.json").write_text(json.dumps(caps))


def _latent_counts(num: int, num_objects_prob: dict[int, float] | None):
    """The object counts of the ``num`` cached scenes (None: the world's own, drawn by each scene)."""
    return None if num_objects_prob is None else draw_object_counts(np.random.default_rng(123), num_objects_prob, num)


def encode_grounding(tok, work: Path, num: int, seed0: int = 0, num_objects_prob: dict[int, float] | None = None,
                     res: int = IMAGE_SIZE // 8) -> None:
    """Grounding targets of the scenes :func:`encode_latents` cached (same seeds and object counts):
    ``owners`` (num, 77) int8, the object each caption token describes (-1: none), and ``masks``
    (num, 3, res, res), each object's area fraction per latent cell."""
    from .grounding import object_masks, token_owners

    path = work / "grounding.safetensors"
    if path.exists() and load_file(str(path))["owners"].shape[0] == num:
        return
    counts = _latent_counts(num, num_objects_prob)
    captions = json.loads((work / "captions.json").read_text()) if (work / "captions.json").exists() else None
    owners, masks, cache = [], [], {}
    for j in tqdm(range(num), desc="grounding"):
        sc = sample_scene(seed0 + j, None if counts is None else int(counts[j]))
        if captions is not None and captions[j] != sc.caption:
            raise RuntimeError(f"scene {seed0 + j} does not reproduce cached caption {j} ({captions[j]!r} vs "
                               f"{sc.caption!r}); the latents in {work} were made with other seeds or counts")
        owners.append(token_owners(sc, tok, cache=cache))
        masks.append(object_masks(sc, res))
    save_file({"owners": torch.from_numpy(np.stack(owners)), "masks": torch.from_numpy(np.stack(masks)).half()},
              str(path))


def train_unet(unet, text, tok, work: Path, steps: int, scaling: float, batch: int = 64, lr: float = 3e-4,
               cond_drop: float = 0.1, ema_decay: float = 0.999, log_every: int = 100,
               ckpt_every: int = 1000, time_limit_s: float | None = None, seconds_before: float = 0.0,
               warmup: int = 500, ema_warmup: bool = True, seed: int = 5678, stop_at: int | None = None,
               grounding: float = 0.0, grounding_pixel: float = 0.0, pixel_min_objects: int = 1) -> list[float]:
    """Epsilon-prediction training of UNet + text encoder on the cached latents of ``work``; returns
    the denoising (MSE) loss of every step.

    Starts from the modules' current weights (the EMA too) unless ``work/unet_ckpt`` holds a
    checkpoint. The learning rate warms up over ``warmup`` steps, then follows a cosine down to a
    tenth; the EMA decay ramps up to ``ema_decay`` when ``ema_warmup`` (from scratch) and is fixed
    otherwise (fine-tuning). Checkpoints record the stage's total seconds; ``seconds_before`` is
    that total for a checkpoint written before they did. ``stop_at`` ends the run (checkpointed)
    at that step of the ``steps``-long schedule. ``grounding > 0`` adds that multiple of the token
    grounding loss (:mod:`.grounding`; needs ``work/grounding.safetensors`` from
    :func:`encode_grounding`) on the cross-attention layers at latent resolution and half of it, plus
    ``grounding_pixel`` times its pixel term (on scenes of at least ``pixel_min_objects`` objects)."""
    from contextlib import ExitStack

    from diffusers import DDPMScheduler

    from .grounding import AttentionTap, grounding_loss, pixel_grounding_loss

    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    latents = load_file(str(work / "latents.safetensors"))["latents"] * scaling
    captions = json.loads((work / "captions.json").read_text())
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {"unet": {k: v.detach().clone() for k, v in unet.state_dict().items()},
           "text": {k: v.detach().clone() for k, v in text.state_dict().items()}}
    ckpt = work / "unet_ckpt"
    start, seconds0 = 0, 0.0
    if (ckpt / "state.json").exists():
        st = _load_ckpt(ckpt, {"unet": unet, "text": text}, opt)
        start, seconds0 = st["step"], st.get("seconds") or seconds_before
        ema = {"unet": load_file(str(ckpt / "ema_unet.safetensors")), "text": load_file(str(ckpt / "ema_text.safetensors"))}
    ids_all = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    if grounding < 0 or grounding_pixel < 0:
        raise ValueError(f"grounding and grounding_pixel must be >= 0, got {grounding} and {grounding_pixel}")
    if pixel_min_objects not in (1, 2, 3):
        raise ValueError(f"pixel_min_objects must be 1, 2 or 3 (objects per scene), got {pixel_min_objects}")
    tap = AttentionTap() if grounding > 0 else None
    if tap is not None:
        gpath = work / "grounding.safetensors"
        if not gpath.exists():
            raise FileNotFoundError(f"grounding={grounding} needs {gpath}; make it with encode_grounding")
        gdata = load_file(str(gpath))
        owners_all, masks_all = gdata["owners"].long(), gdata["masks"].float()
        if owners_all.shape[0] != latents.shape[0]:
            raise ValueError(f"{gpath} has {owners_all.shape[0]} scenes, the latents {latents.shape[0]}")
        pixel_rows = (masks_all.flatten(2).sum(-1) > 0).sum(1) >= pixel_min_objects  # scenes the pixel term sees
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    abar = sched.alphas_cumprod
    g = torch.Generator().manual_seed(seed + start)
    unet.train()
    text.train()
    losses, glosses = [], []
    t0 = time.time()
    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(range(start, end), desc="unet", initial=start, total=end)
    hooks = ExitStack()
    if tap is not None:
        hooks.enter_context(tap.installed(unet))
    with hooks:  # the grounding tap (if any) leaves the UNet's processors as they were
        for step in bar:
            warm = min(1.0, (step + 1) / warmup)
            for grp in opt.param_groups:
                grp["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
            idx = torch.randint(0, latents.shape[0], (batch,), generator=g)
            x0 = latents[idx]
            ids = ids_all[idx].clone()
            drop = torch.rand(batch, generator=g) < cond_drop
            ids[drop] = empty
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            emb = text(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=emb).sample
            loss = mse = F.mse_loss(pred, noise)
            if tap is not None:
                own, obj_masks = owners_all[idx], masks_all[idx]
                gl = grounding_loss(tap.probs, own, obj_masks, valid=~drop)
                if grounding_pixel > 0:
                    gl = gl + grounding_pixel * pixel_grounding_loss(tap.probs, own, obj_masks,
                                                                     valid=~drop & pixel_rows[idx])
                glosses.append(gl.item())
                loss = loss + grounding * gl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
                for name, m in (("unet", unet), ("text", text)):
                    for k, v in m.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[name][k].mul_(d).add_(v.detach(), alpha=1 - d)
                        else:
                            ema[name][k].copy_(v)
            losses.append(mse.item())
            if step % log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}",
                                **({"grounding": f"{np.mean(glosses[-log_every:]):.3f}"} if glosses else {}))
            out_of_time = time_limit_s is not None and time.time() - t0 > time_limit_s
            if (step + 1) % ckpt_every == 0 or step + 1 == end or out_of_time:
                _save_ckpt(ckpt, {"unet": unet, "text": text}, opt, step + 1, {"seconds": seconds0 + time.time() - t0})
                save_file(ema["unet"], str(ckpt / "ema_unet.safetensors"))
                save_file(ema["text"], str(ckpt / "ema_text.safetensors"))
            if out_of_time:
                break
    unet.eval()
    text.eval()
    return losses


def export(work: Path, out: Path, tiny: bool = False, use_ema: bool = True) -> Path:
    """Assemble the trained parts into a StableDiffusionPipeline folder (safetensors)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok, vae, unet, text = _models(tiny, work / "tokenizer")
    load_trained_vae(vae, work)
    state = json.loads((work / "state.json").read_text())
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    prefix = "ema_" if use_ema else ""
    unet.load_state_dict(load_file(str(work / "unet_ckpt" / f"{prefix}unet.safetensors")))
    text.load_state_dict(load_file(str(work / "unet_ckpt" / f"{prefix}text.safetensors")))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(state, indent=2))
    return out


# A fine-tuning stage for an exported model. The shipped model is the base model plus three grounded
# UNet + text encoder stages and one decoder stage of it (README, Benchmarks, ShapesWorld, has the
# commands and what each stage did). The decoder part (default) lifts the VAE's oracle agreement from
# 0.96 to 0.99; the UNet part without grounding draws more two-object scenes right but moves
# injected-bias shares more than 10 points off; with the grounding loss it binds colours to shapes.
FINETUNE = dict(steps=0, stop_at=None, lr=1e-4, num_latents=30000, seed0=10**7, objects={1: 0.35, 2: 0.5, 3: 0.15},
                warmup=200, ema_decay=0.998, seed=999, grounding=0.0, grounding_pixel=0.0, pixel_min_objects=1,
                # and the decoder (encoder frozen), on the crowded scenes whose small shapes it blurred
                decoder_steps=2000, decoder_lr=2e-4, decoder_objects={1: 0.25, 2: 0.35, 3: 0.4})


def finetune_history(record: dict) -> list[dict]:
    """The fine-tune stages a ``training.json`` record holds, oldest first (older exports kept only the
    last one, under ``"finetune"``)."""
    return list(record.get("finetunes", [record["finetune"]] if "finetune" in record else []))


def training_seconds(record: dict) -> float:
    """Training time of a ``training.json`` record: the wall clock of the whole recipe when it was trained
    by :func:`train_recipe`, else the sum of the stages' recorded seconds (which leaves out the
    encoding of latents and the oracle checks between them)."""
    if "recipe" in record:
        return float(record["recipe"]["seconds"])
    return (record.get("vae_seconds", 0) + record.get("decoder_seconds", 0) + record.get("unet_seconds", 0)
            + sum((f.get("seconds") or 0) + (f.get("decoder_seconds") or 0) for f in finetune_history(record)))


def finetune(init: Path, work: Path, out: Path, steps: int = FINETUNE["steps"], stop_at: int | None = FINETUNE["stop_at"],
             lr: float = FINETUNE["lr"],
             num_latents: int = FINETUNE["num_latents"], objects: dict[int, float] | None = None,
             batch: int = 64, time_limit_s: float | None = None, ckpt_every: int = 500,
             decoder_steps: int = FINETUNE["decoder_steps"], decoder_lr: float = FINETUNE["decoder_lr"],
             vae_check: int = 400, grounding: float = FINETUNE["grounding"],
             grounding_pixel: float = FINETUNE["grounding_pixel"],
             pixel_min_objects: int = FINETUNE["pixel_min_objects"]) -> dict:
    """Continue training the UNet + text encoder of the pipeline in ``init``, then its VAE decoder.

    Latents of ``num_latents`` fresh scenes whose object counts follow ``objects`` (default
    ``FINETUNE["objects"]``) are cached in ``work``; training follows a ``steps``-long schedule,
    ends at ``stop_at`` (None: at the end) and is resumable there; ``grounding > 0`` adds the token
    grounding loss (:mod:`.grounding`) with that weight. The decoder is
    then sharpened for ``decoder_steps`` with the encoder frozen (so the latents, and the UNet's
    data, do not move) and checked by the oracle on ``vae_check`` held-out scenes. The EMA weights
    and the decoder are exported to ``out`` (which may be ``init``) with the fine-tuning recorded
    in ``training.json``. Returns that record."""
    from . import load_shapesworld_pipeline

    objects = dict(FINETUNE["objects"] if objects is None else objects)
    if any(k not in (1, 2, 3) or v < 0 for k, v in objects.items()) or not math.isclose(sum(objects.values()), 1.0):
        raise ValueError(f"objects must map object counts 1-3 to probabilities summing to 1, got {objects}")
    if min(steps, decoder_steps, grounding, grounding_pixel) < 0:
        raise ValueError(f"steps, decoder_steps, grounding and grounding_pixel must be >= 0, got {steps}, "
                         f"{decoder_steps}, {grounding} and {grounding_pixel}")
    work.mkdir(parents=True, exist_ok=True)
    pipe = load_shapesworld_pipeline(init)
    record = json.loads((Path(init) / "training.json").read_text()) if (Path(init) / "training.json").exists() else {}
    history = finetune_history(record)  # earlier fine-tunes of ``init`` stay on record
    record["finetune"] = {"steps_done": 0}
    if steps > 0:
        encode_latents(pipe.vae, work, num_latents, seed0=FINETUNE["seed0"], num_objects_prob=objects)
        if grounding > 0:
            encode_grounding(pipe.tokenizer, work, num_latents, seed0=FINETUNE["seed0"], num_objects_prob=objects)
        ckpt = work / "unet_ckpt"
        train_unet(pipe.unet, pipe.text_encoder, pipe.tokenizer, work, steps, pipe.vae.config.scaling_factor,
                   batch=batch, lr=lr, warmup=FINETUNE["warmup"], ema_decay=FINETUNE["ema_decay"], ema_warmup=False,
                   seed=FINETUNE["seed"], ckpt_every=ckpt_every, time_limit_s=time_limit_s, stop_at=stop_at,
                   grounding=grounding, grounding_pixel=grounding_pixel, pixel_min_objects=pixel_min_objects)
        st = json.loads((ckpt / "state.json").read_text())
        pipe.unet.load_state_dict(load_file(str(ckpt / "ema_unet.safetensors")))
        pipe.text_encoder.load_state_dict(load_file(str(ckpt / "ema_text.safetensors")))
        record["finetune"] = {"steps_done": st["step"], "schedule_steps": steps, "seconds": st["seconds"], "lr": lr,
                              "num_latents": num_latents, "objects": {str(k): v for k, v in objects.items()},
                              "batch": batch, "grounding": grounding, "grounding_pixel": grounding_pixel,
                              "pixel_min_objects": pixel_min_objects}
    if decoder_steps > 0:
        finetune_decoder(pipe.vae, work, decoder_steps, lr=decoder_lr, num_objects_prob=FINETUNE["decoder_objects"])
        dst = json.loads((work / "decoder_ckpt" / "state.json").read_text())
        record["finetune"].update(decoder_steps=dst["step"], decoder_lr=decoder_lr,
                                  decoder_seconds=dst.get("seconds"),
                                  vae_agreement=vae_oracle_agreement(pipe.vae, n=vae_check))
    record["finetunes"] = history + [record["finetune"]]
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for cfg in [out / "model_index.json", *out.glob("*/config.json")]:  # no paths of this machine in the package
        d = json.loads(cfg.read_text())
        if d.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2))
    stale = sorted(c.name for c in out.glob("*_calibration.json"))
    if stale:
        print(f"note: {', '.join(stale)} in {out} were fitted for the model before this fine-tune; refit them "
              "(benchmarks/classifier.py and benchmarks/inconsistency.py with --save-calibration)")
    return record


def _decoder_stage(vae, work: Path, steps: int, tiny: bool = False) -> float:
    """Sharpen the decoder of ``work``'s VAE (:func:`finetune_decoder`), judge it by the oracle and record
    that in ``work/decoder_ckpt/agreement.json`` (merged into the export's record); returns the agreement."""
    t0 = time.time()
    finetune_decoder(vae, work, steps)
    agreement = vae_oracle_agreement(vae, n=100 if tiny else 400)
    print(f"VAE (sharpened decoder) reconstructions judged like the originals: {agreement:.3f}")
    (work / "decoder_ckpt" / "agreement.json").write_text(json.dumps(
        {"vae_agreement": agreement, "decoder_steps": steps, "decoder_seconds": time.time() - t0}))
    return agreement


def _merge_decoder_record(work: Path) -> None:
    dec, state_path = work / "decoder_ckpt" / "agreement.json", work / "state.json"
    if dec.exists():
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        state.update(json.loads(dec.read_text()))
        state_path.write_text(json.dumps(state, indent=2))


def train_base(work: Path, out: Path, vae_steps: int, num_latents: int, unet_steps: int, decoder_steps: int = 0,
               batch: int = 64, tiny: bool = False, time_limit_s: float | None = None) -> Path:
    """The base model from scratch in ``work`` (every stage resumable): the VAE, checked by the oracle;
    the latents of ``num_latents`` seeded scenes; the UNet + text encoder; with ``decoder_steps > 0``
    the decoder sharpened (encoder frozen); exported to ``out``, which is returned."""
    work.mkdir(parents=True, exist_ok=True)
    tok, vae, unet, text = _models(tiny, write_tokenizer_files(work / "tokenizer"))
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    t0 = time.time()
    train_vae(vae, work, vae_steps)
    if "vae_agreement" not in state or state.get("vae_steps") != vae_steps:
        state["vae_agreement"] = vae_oracle_agreement(vae, n=100 if tiny else 400)
        state["vae_steps"] = vae_steps
        state["vae_seconds"] = time.time() - t0
        print(f"VAE reconstructions judged like the originals by the oracle: {state['vae_agreement']:.3f}")
    encode_latents(vae, work, num_latents)
    lat = load_file(str(work / "latents.safetensors"))["latents"]
    state["scaling_factor"] = float(1.0 / lat.std())
    state_path.write_text(json.dumps(state, indent=2))
    t1 = time.time()
    train_unet(unet, text, tok, work, unet_steps, state["scaling_factor"], batch=batch, time_limit_s=time_limit_s,
               seconds_before=state.get("unet_seconds", 0.0))
    ck = json.loads((work / "unet_ckpt" / "state.json").read_text())
    # checkpoints carry the UNet stage's total seconds (so interrupted runs still count)
    state["unet_seconds"] = ck.get("seconds", state.get("unet_seconds", 0.0) + time.time() - t1)
    state["unet_steps_done"] = ck["step"]
    state_path.write_text(json.dumps(state, indent=2))
    if decoder_steps > 0 and ck["step"] >= unet_steps:
        done = work / "decoder_ckpt" / "agreement.json"
        if not done.exists() or json.loads(done.read_text())["decoder_steps"] != decoder_steps:
            _decoder_stage(vae, work, decoder_steps, tiny)
        _merge_decoder_record(work)
    return export(work, out, tiny=tiny)


# The shipped model's whole recipe (``--stage recipe``; README, Benchmarks, ShapesWorld, tells how each
# part was chosen): the base model with its decoder sharpened, three grounded UNet + text encoder
# fine-tunes on the world's own object counts, then the decoder again on crowded scenes.
RECIPE = dict(
    base=dict(vae_steps=1000, num_latents=24000, unet_steps=9500, decoder_steps=3000),
    grounded=[dict(steps=2500, lr=1e-4, pixel_min_objects=1), dict(steps=2500, lr=2e-4, pixel_min_objects=1),
              dict(steps=2000, lr=1e-4, pixel_min_objects=2)],
    objects=dict(NUM_OBJECTS_PROB), grounding=0.1, grounding_pixel=1.0, num_latents=FINETUNE["num_latents"],
    decoder_steps=FINETUNE["decoder_steps"], batch=64, vae_check=400,
)


def train_recipe(work: Path, out: Path, recipe: dict | None = None, tiny: bool = False) -> dict:
    """Train the shipped model from scratch in one call: :data:`RECIPE` (or ``recipe``) in ``work``,
    exported to ``out``. Each part runs in its own folder of ``work`` and is resumable; a finished part
    is skipped on a rerun. The grounded parts share one latent cache (same scenes, same frozen
    encoder). ``work/recipe.json`` keeps each finished part's wall-clock seconds; the exported
    ``training.json`` gets them under ``"recipe"`` (with their sum, ``"seconds"``). Returns that record."""
    r = dict(RECIPE if recipe is None else recipe)
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "recipe.json"
    parts = json.loads(log_path.read_text()) if log_path.exists() else {}

    def part(name: str, fn):
        if name in parts:
            print(f"recipe: {name} done earlier ({parts[name] / 60:.1f} min), skipped")
            return
        t0 = time.time()
        fn()
        parts[name] = time.time() - t0
        log_path.write_text(json.dumps(parts, indent=2))
        print(f"recipe: {name} took {parts[name] / 60:.1f} min")

    b = r["base"]
    part("base", lambda: train_base(work / "base", work / "model_base", b["vae_steps"], b["num_latents"],
                                    b["unet_steps"], b["decoder_steps"], batch=r["batch"], tiny=tiny))
    init = work / "model_base"
    for i, st in enumerate(r["grounded"], start=1):
        wdir, model = work / f"grounded{i}", work / f"model_grounded{i}"
        if i > 1:  # the same seeded scenes, encoded by the same (frozen) encoder: reuse the first cache
            wdir.mkdir(parents=True, exist_ok=True)
            for f in ("latents.safetensors", "captions.json", "grounding.safetensors"):
                if not (wdir / f).exists():
                    shutil.copy(work / "grounded1" / f, wdir / f)
        part(f"grounded{i}", lambda init=init, wdir=wdir, model=model, st=st: finetune(
            init, wdir, model, steps=st["steps"], lr=st["lr"], num_latents=r["num_latents"], objects=r["objects"],
            batch=r["batch"], decoder_steps=0, grounding=r["grounding"], grounding_pixel=r["grounding_pixel"],
            pixel_min_objects=st["pixel_min_objects"]))
        init = model
    part("decoder", lambda: finetune(init, work / "decoder", out, steps=0, decoder_steps=r["decoder_steps"],
                                     vae_check=r["vae_check"]))
    record = json.loads((out / "training.json").read_text())
    record["recipe"] = {"parts_seconds": dict(parts), "seconds": sum(parts.values()),
                        "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/shapesworld"), help="checkpoints and caches")
    p.add_argument("--out", type=Path, default=PACKAGE_MODEL_DIR, help="where the pipeline is exported")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=11000)
    p.add_argument("--num-latents", type=int, default=60000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--time-limit-min", type=float, default=None, help="stop the UNet stage (checkpointed) after this")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration (for tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stage", choices=["recipe", "all", "decoder", "export", "finetune"], default="recipe",
                   help="recipe (default): the shipped model's whole recipe (RECIPE: the base model, three grounded "
                        "fine-tunes, the decoder; about 2 h on 2 CPU threads); all: VAE, latents, UNet, export "
                        "(a base model, with the --vae-steps, --num-latents and --unet-steps given); decoder: "
                        "sharpen the VAE decoder (encoder frozen, so it can run beside the UNet stage); export: "
                        "assemble the latest checkpoints; finetune: continue training the model in --init on more multi-object scenes")
    p.add_argument("--decoder-steps", type=int, default=1500)
    p.add_argument("--init", type=Path, default=PACKAGE_MODEL_DIR, help="finetune: the pipeline to start from")
    p.add_argument("--finetune-steps", type=int, default=FINETUNE["steps"],
                   help="UNet: length of the cosine schedule (0, the default: keep the UNet)")
    p.add_argument("--finetune-stop-at", type=int, default=FINETUNE["stop_at"], help="end at this step (0: at the end)")
    p.add_argument("--finetune-lr", type=float, default=FINETUNE["lr"])
    p.add_argument("--finetune-latents", type=int, default=FINETUNE["num_latents"])
    p.add_argument("--finetune-decoder-steps", type=int, default=FINETUNE["decoder_steps"])
    p.add_argument("--finetune-grounding", type=float, default=FINETUNE["grounding"],
                   help="UNet: weight of the token grounding loss (cross-attention of a word on its object; 0: off)")
    p.add_argument("--finetune-grounding-pixel", type=float, default=FINETUNE["grounding_pixel"],
                   help="UNet: weight, relative to --finetune-grounding, of its pixel term (an object's positions "
                        "attend to its own words)")
    p.add_argument("--finetune-pixel-min-objects", type=int, default=FINETUNE["pixel_min_objects"], choices=(1, 2, 3),
                   help="UNet: apply the pixel term to scenes with at least this many objects")
    p.add_argument("--finetune-objects", default=None,
                   help="UNet: shares of scenes with 1,2,3 objects, e.g. 0.5,0.35,0.15 (the world's own); "
                        f"default {','.join(str(v) for v in FINETUNE['objects'].values())}")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.stage == "finetune":
        objects = None
        if a.finetune_objects:
            try:
                shares = [float(v) for v in a.finetune_objects.split(",")]
            except ValueError:
                p.error(f"--finetune-objects must be three comma-separated shares, got {a.finetune_objects!r}")
            if len(shares) != 3:
                p.error(f"--finetune-objects must be three comma-separated shares, got {a.finetune_objects!r}")
            objects = dict(zip((1, 2, 3), shares))
        rec = finetune(a.init, a.work, a.out, steps=a.finetune_steps, stop_at=a.finetune_stop_at or None,
                       lr=a.finetune_lr,
                       num_latents=a.finetune_latents, objects=objects, batch=a.batch,
                       decoder_steps=a.finetune_decoder_steps, grounding=a.finetune_grounding,
                       grounding_pixel=a.finetune_grounding_pixel, pixel_min_objects=a.finetune_pixel_min_objects,
                       time_limit_s=a.time_limit_min * 60 if a.time_limit_min else None)
        ft = rec["finetune"]
        print(f"fine-tuned: UNet {ft['steps_done']} steps, decoder {ft.get('decoder_steps', 0)} steps "
              f"(VAE agreement {ft.get('vae_agreement')}); exported to {a.out}")
        return
    if a.stage == "recipe":
        rec = train_recipe(a.work, a.out, tiny=a.tiny)
        print(f"recipe done in {rec['recipe']['seconds'] / 60:.1f} min; exported to {a.out}")
        return
    if a.stage == "decoder":
        a.work.mkdir(parents=True, exist_ok=True)
        tok, vae, unet, text = _models(a.tiny, write_tokenizer_files(a.work / "tokenizer"))
        vae.load_state_dict(load_file(str(a.work / "vae_ckpt" / "vae.safetensors")))
        _decoder_stage(vae, a.work, a.decoder_steps, a.tiny)
        return
    if a.stage == "export":
        _merge_decoder_record(a.work)
        export(a.work, a.out, tiny=a.tiny)
        print(f"exported to {a.out}")
        return
    train_base(a.work, a.out, vae_steps=a.vae_steps, num_latents=a.num_latents, unet_steps=a.unet_steps,
               batch=a.batch, tiny=a.tiny, time_limit_s=a.time_limit_min * 60 if a.time_limit_min else None)
    print(f"exported to {a.out}")


if __name__ == "__main__":
    main()
