"""Pointwise information and DiffusionPID: which words of a caption inform which pixels of an image.

Maths (``METHODS.md`` section 2; Kong et al., ICLR 2024; Dewan et al., NeurIPS 2024). With logSNR
``a`` and ``x_a = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps``, the *orthogonal pointwise mutual
information* between an image ``x`` and words ``y`` is::

    i(x; y) = 1/2 * integral over a of E_eps || eps_hat(x_a, y) - eps_hat(x_a, "") ||^2 da      (nats, >= 0)

and the conditional version ``i(x; y | c)`` replaces ``""`` by the context ``c`` and ``y`` by ``c`` with
``y``. Keeping the squared difference per latent pixel (summed over channels only) gives a pixel map
whose sum is exactly the image-level value.

The integral over ``a`` is estimated by importance sampling from a truncated logistic:
``a = loc + scale * logit(u)``, ``u`` uniform on ``[sigmoid(-clip), sigmoid(clip)]`` (so ``a`` covers
``[loc - scale*clip, loc + scale*clip]``, ``[-5, 7]`` at the reference defaults), with weight
``scale * tanh(clip/2) / (u (1 - u))`` = 1 / density. ``u`` is stratified (one draw in each of ``N``
equal slices of the interval, in random order): every ``u`` is still uniform, so the estimate stays
unbiased, with a much smaller variance than i.i.d. draws. For a real model each ``a`` is mapped to the
nearest trained timestep (the noised latent uses that timestep's own noise level; the weight uses the
sampled ``a``). All conditions of one ``(a, eps)`` sample share it (common random numbers) and go
through :meth:`XAIPipeline.predict_noise` in one batch: ``M`` conditions x ``N`` samples = exactly
``M * N`` UNet evaluations.

PID of two words ``y1, y2`` (pointwise, per pixel): ``I1 = i(x; y1)``, ``I2 = i(x; y2)``,
``I12 = i(x; y1, y2)``; redundancy ``R`` (default: pointwise minimum ``min(I1, I2)`` per latent pixel,
pluggable), uniquenesses ``U1 = I1 - R``, ``U2 = I2 - R``, synergy ``S = I12 - I1 - I2 + R``. Image-level
values are sums over pixels. The conditional PID (the default) conditions every term on the rest of the
prompt: the four conditions are ``c``, ``c+y1``, ``c+y2``, ``c+y1+y2``.

Removing words from a condition: ``removal="string"`` (the reference convention) deletes them from the
caption and re-encodes it; ``removal="embedding"`` keeps the full caption's text-encoder output and
replaces the removed words' token embeddings by the empty prompt's embeddings at the same positions (so
later tokens, which the causal text encoder lets see the word, keep their context: it measures the word's
direct cross-attention path). SDXL's pooled embedding is the string-removed caption's in both modes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .pipeline import PromptEmbeddings
from .results import load_result, save_result
from .tokens import _find_phrase, find_word, split_words, validate_prompt, word_tokens

DEFAULT_NUM_SAMPLES = 100
DEFAULT_LOC, DEFAULT_SCALE, DEFAULT_CLIP = 1.0, 2.0, 3.0
REMOVALS = ("string", "embedding")
PID_TERMS = ("I1", "I2", "I12", "R", "U1", "U2", "S")

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ============================================================================ the estimator core (pure)
def validate_integration(num_samples: int, loc: float, scale: float, clip: float) -> None:
    """Raise ``ValueError`` for a bad sample count or logistic proposal."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    for name, v in (("loc", loc), ("scale", scale), ("clip", clip)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if clip <= 0:
        raise ValueError(f"clip must be > 0 (the logSNR range is loc +/- scale*clip), got {clip}")


def logistic_logsnr(num_samples: int, loc: float = DEFAULT_LOC, scale: float = DEFAULT_SCALE,
                    clip: float = DEFAULT_CLIP, generator: torch.Generator | None = None,
                    stratified: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance samples of logSNR and their weights (1 / proposal density).

    Returns:
        ``(a, weight)``, both (num_samples,) float64: ``a = loc + scale * logit(u)`` with ``u`` uniform on
        ``[sigmoid(-clip), sigmoid(clip)]`` (stratified: one ``u`` per equal slice, shuffled), and
        ``weight = scale * tanh(clip / 2) / (u (1 - u))``, so ``mean(weight * f(a))`` estimates the
        integral of ``f`` over ``[loc - scale*clip, loc + scale*clip]``.
    """
    validate_integration(num_samples, loc, scale, clip)
    n = int(num_samples)
    r = torch.rand(n, generator=generator, dtype=torch.float64)
    v = (torch.arange(n, dtype=torch.float64) + r) / n if stratified else r
    if stratified:
        v = v[torch.randperm(n, generator=generator)]
    lo, hi = 1.0 / (1.0 + math.exp(clip)), 1.0 / (1.0 + math.exp(-clip))
    u = lo + (hi - lo) * v
    a = loc + scale * torch.log(u / (1 - u))
    weight = scale * math.tanh(clip / 2.0) / (u * (1 - u))
    return a, weight


@dataclass
class InformationEstimate:
    """Raw output of :func:`estimate_information`.

    Attributes:
        maps: (P, h, w) float64, one pixel map per (high, low) condition pair, in nats.
        samples: (N, P) float64, every sample's weighted image-level term ``weight * ||d||^2 / 2``
            (their mean is ``maps.sum((1, 2))``; their spread gives the standard error).
        logsnr: (N,) float64, the sampled logSNRs (before snapping to trained timesteps).
    """

    maps: torch.Tensor
    samples: torch.Tensor
    logsnr: torch.Tensor

    @property
    def values(self) -> torch.Tensor:
        """(P,) image-level estimates (sums of the maps)."""
        return self.maps.sum((1, 2))

    @property
    def stderr(self) -> torch.Tensor:
        """(P,) standard errors of the image-level values, as for i.i.d. samples (conservative when
        stratified); 0 when N == 1."""
        n = self.samples.shape[0]
        if n < 2:
            return torch.zeros(self.samples.shape[1], dtype=torch.float64)
        return self.samples.std(0) / math.sqrt(n)


def estimate_information(eps_fn: EpsFn, x0: torch.Tensor, num_conditions: int,
                         pairs: Sequence[tuple[int, int]], num_samples: int = DEFAULT_NUM_SAMPLES,
                         loc: float = DEFAULT_LOC, scale: float = DEFAULT_SCALE, clip: float = DEFAULT_CLIP,
                         generator: torch.Generator | None = None,
                         snap: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         samples_per_call: int | None = None, stratified: bool = True,
                         progress: bool = False) -> InformationEstimate:
    """Pixel maps of ``1/2 int E ||eps_hat(x_a, hi) - eps_hat(x_a, lo)||^2 da`` for condition pairs.

    The integration core shared by every information quantity; it knows nothing about models.

    Args:
        eps_fn: ``eps_fn(x_a, logsnr, condition) -> eps_hat``: ``x_a`` (B, C, h, w), ``logsnr`` (B,)
            float64 (already snapped), ``condition`` (B,) long indices in ``[0, num_conditions)``;
            returns (B, C, h, w). Called once per block of samples with every condition of every
            sample of the block (sample-major: rows ``s*M .. s*M+M-1`` share one ``(a, eps)``).
        x0: (C, h, w) or (1, C, h, w) clean latent; noise and ``x_a`` take its dtype and device.
        num_conditions: ``M``, the number of conditions evaluated per sample.
        pairs: ``(high, low)`` condition indices; one map per pair.
        num_samples: ``N`` samples of ``(a, eps)``; ``eps_fn`` sees ``N * M`` rows in all.
        loc, scale, clip: the logistic proposal of logSNR (see :func:`logistic_logsnr`).
        generator: seeds the logSNRs and the noise (a CPU ``torch.Generator``).
        snap: maps sampled logSNRs to the ones used (e.g. the nearest trained timestep's); identity
            when None. The noise level of ``x_a`` follows the snapped value, the weight the sampled one.
        samples_per_call: samples per ``eps_fn`` call (default: all at once).
        stratified: stratify ``u`` (see module docstring); False draws it i.i.d.
        progress: show a tqdm bar over samples.
    """
    validate_integration(num_samples, loc, scale, clip)
    if num_conditions < 1:
        raise ValueError(f"num_conditions must be >= 1, got {num_conditions}")
    for hi, lo in pairs:
        if not (0 <= hi < num_conditions and 0 <= lo < num_conditions):
            raise ValueError(f"condition pair {(hi, lo)} out of range for {num_conditions} conditions")
    if x0.ndim == 4:
        if x0.shape[0] != 1:
            raise ValueError(f"x0 must hold one latent, got shape {tuple(x0.shape)}")
        x0 = x0[0]
    if x0.ndim != 3:
        raise ValueError(f"x0 must be (C, h, w) or (1, C, h, w), got shape {tuple(x0.shape)}")
    n, m = int(num_samples), int(num_conditions)
    a, weight = logistic_logsnr(n, loc, scale, clip, generator, stratified)
    a_used = a if snap is None else torch.as_tensor(snap(a), dtype=torch.float64)
    block = max(1, min(n, samples_per_call or n))
    c, h, w = x0.shape
    sums = torch.zeros(len(pairs), h, w, dtype=torch.float64)
    per_sample = torch.zeros(n, len(pairs), dtype=torch.float64)
    cond = torch.arange(m, dtype=torch.long)
    # all noise drawn up front (N x latent, small): the numbers do not depend on samples_per_call
    noise = torch.randn(n, c, h, w, generator=generator, dtype=torch.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="information", unit="sample", leave=False)
    try:
        for s0 in range(0, n, block):
            k = min(block, n - s0)
            eps = noise[s0:s0 + k].to(x0.device, x0.dtype)
            au = a_used[s0:s0 + k]
            ab = torch.sigmoid(au)  # alpha^2 in float64
            sa = ab.sqrt().to(x0.device, x0.dtype).view(k, 1, 1, 1)
            ss = (1 - ab).sqrt().to(x0.device, x0.dtype).view(k, 1, 1, 1)
            x_a = sa * x0[None] + ss * eps  # (k, C, h, w)
            rows = x_a.repeat_interleave(m, dim=0)
            out = eps_fn(rows, au.repeat_interleave(m), cond.repeat(k))
            if out.shape != rows.shape:
                raise RuntimeError(f"eps_fn returned shape {tuple(out.shape)}, expected {tuple(rows.shape)}")
            out = out.view(k, m, c, h, w)
            wk = weight[s0:s0 + k].view(k, 1, 1)
            for p, (hi, lo) in enumerate(pairs):
                d = (out[:, hi].double() - out[:, lo].double()).pow(2).sum(1).cpu() * wk / 2  # (k, h, w)
                sums[p] += d.sum(0)
                per_sample[s0:s0 + k, p] = d.sum((1, 2))
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    return InformationEstimate(maps=sums / n, samples=per_sample, logsnr=a)


# ============================================================================ PID algebra (pure)
def pointwise_min(i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Redundancy as the pointwise minimum of the two informations, per pixel (the default)."""
    return torch.minimum(i1, i2)


REDUNDANCIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"min": pointwise_min}


def _redundancy_fn(redundancy) -> tuple[str, Callable]:
    if isinstance(redundancy, str):
        if redundancy not in REDUNDANCIES:
            raise ValueError(f"unknown redundancy {redundancy!r}; allowed: {', '.join(REDUNDANCIES)} "
                             f"or a callable (i1_map, i2_map) -> r_map")
        return redundancy, REDUNDANCIES[redundancy]
    if callable(redundancy):
        return getattr(redundancy, "__name__", type(redundancy).__name__), redundancy
    raise ValueError(f"redundancy must be one of {', '.join(REDUNDANCIES)} or a callable, got {redundancy!r}")


def pid_maps(i1: torch.Tensor, i2: torch.Tensor, i12: torch.Tensor, redundancy="min") -> dict[str, torch.Tensor]:
    """Partial information decomposition of pixel maps.

    Args:
        i1, i2, i12: (h, w) maps of ``i(x; y1)``, ``i(x; y2)``, ``i(x; y1, y2)`` (same conditioning).
        redundancy: ``"min"`` (pointwise minimum) or a callable ``(i1, i2) -> r`` returning an (h, w) map.
    Returns:
        Maps ``I1, I2, I12, R, U1, U2, S`` with ``U1 = I1 - R``, ``U2 = I2 - R``, ``S = I12 - I1 - I2 + R``.
    """
    _, fn = _redundancy_fn(redundancy)
    r = torch.as_tensor(fn(i1, i2), dtype=i1.dtype)
    if r.shape != i1.shape:
        raise ValueError(f"redundancy returned shape {tuple(r.shape)}, expected {tuple(i1.shape)}")
    return {"I1": i1, "I2": i2, "I12": i12, "R": r, "U1": i1 - r, "U2": i2 - r, "S": i12 - i1 - i2 + r}


# ============================================================================ conditions from a prompt
def _word_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Indices into ``split_words(prompt)`` of every occurrence of ``word`` (a word or phrase)."""
    find_word(tokenizer, prompt, word)  # the standard errors: not in prompt, truncated
    words = split_words(prompt)
    phrase = split_words(word)
    return sorted({s + k for s in _find_phrase(words, phrase) for k in range(len(phrase))})


def _as_word_list(words, name: str) -> list[str]:
    if isinstance(words, str):
        words = [words]
    words = list(words)
    if not words:
        raise ValueError(f"{name} must name at least one word, got {words!r}")
    for w in words:
        if not isinstance(w, str) or not split_words(w):
            raise ValueError(f"every entry of {name} must be a non-empty word, got {w!r}")
    return words


def _check_disjoint(groups: dict[str, list[int]], prompt: str) -> None:
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = set(groups[a]) & set(groups[b])
            if both:
                ws = split_words(prompt)
                raise ValueError(f"{a} and {b} share the word(s) {sorted({ws[k] for k in both})} of prompt "
                                 f"{prompt!r}; give each word once")


@dataclass
class _Conditions:
    embeddings: PromptEmbeddings  # (M rows)
    labels: list[str]


def _build_conditions(xp, prompt: str, kept: list[set[int]], removal: str) -> _Conditions:
    """Embeddings of ``prompt`` keeping only the words with indices in each set of ``kept``."""
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    words = split_words(prompt)
    everything = set(range(len(words)))
    texts = [prompt if k == everything else " ".join(words[i] for i in sorted(k)) for k in kept]
    if removal == "string":
        return _Conditions(xp.encode_prompt(texts), texts)
    if xp.is_sdxl:
        from .tokens import check_same_positions

        check_same_positions(xp.tokenizers, prompt)
    full, empty = xp.encode_prompt(prompt), xp.encode_prompt("")
    table = word_tokens(xp.pipe.tokenizer, prompt)
    rows, labels = [], []
    for k, text in zip(kept, texts):
        e = full.embeds.clone()
        pos = [p for wt in table if wt.index not in k for p in wt.positions if p < e.shape[1]]
        if pos:
            e[:, pos] = empty.embeds[:, pos].to(e.dtype)
        pooled = None if full.pooled is None else xp.encode_prompt(text).pooled
        label = " ".join(w if i in k else "_" for i, w in enumerate(words))
        rows.append(PromptEmbeddings(e, pooled, [label]))
        labels.append(label)
    return _Conditions(PromptEmbeddings.cat(rows), labels)


def model_eps_fn(xp, embeddings: PromptEmbeddings, batch_size: int | None = None) -> EpsFn:
    """``eps_fn`` of a pipeline: condition ``j`` is row ``j`` of ``embeddings``; logSNRs must be trained
    timesteps' (see :func:`snap_to_timesteps`). Runs through ``xp.predict_noise`` (counts UNet evals)."""
    def fn(x_a: torch.Tensor, logsnr: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        t = xp.logsnr_to_t(logsnr)
        return xp.predict_noise(x_a, t, embeddings.index(condition), batch_size=batch_size)
    return fn


def snap_to_timesteps(xp) -> Callable[[torch.Tensor], torch.Tensor]:
    """logSNR -> the logSNR of the nearest trained timestep of ``xp``'s schedule."""
    return lambda a: xp.t_to_logsnr(xp.logsnr_to_t(a))


def _latent_of(xp, image_or_latent) -> tuple[torch.Tensor, Image.Image | None]:
    """(1, C, h, w) float32 latent on the model's device, and the PIL image when one was given."""
    x = image_or_latent
    if isinstance(x, torch.Tensor):
        x = x if x.ndim == 4 else x[None]
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"give one image or latent at a time, got a tensor of shape {tuple(image_or_latent.shape)}")
        lat_c = int(xp.unet.config.in_channels)
        if x.shape[1] == lat_c:
            return x.float().to(xp.device), None
        if x.shape[1] == 3:
            return xp.encode_image(x), None
        raise ValueError(f"a tensor must be a (1, 3, H, W) image in [-1, 1] or a (1, {lat_c}, h, w) latent, "
                         f"got shape {tuple(image_or_latent.shape)}")
    if isinstance(x, np.ndarray):
        if x.ndim == 4 and x.shape[0] != 1:
            raise ValueError(f"give one image at a time, got an array of shape {x.shape}")
        x = x[0] if x.ndim == 4 else x
        if x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8:
            return xp.encode_image(x), Image.fromarray(x)
        return xp.encode_image(x), None  # encode_image names the problem
    if isinstance(x, Image.Image):
        return xp.encode_image(x), x
    raise ValueError(f"image_or_latent must be a PIL image, a uint8 (H, W, 3) array or a tensor, "
                     f"got {type(image_or_latent).__name__}")


def _generator(seed: int) -> torch.Generator:
    from .pipeline import validate_seed

    return torch.Generator("cpu").manual_seed(validate_seed(seed))


# ============================================================================ information on a pipeline
@dataclass
class InformationResult:
    """Pointwise (conditional) mutual information of words with an image.

    Attributes:
        value: image-level information in nats (= ``pixel_map.sum()``).
        pixel_map: (h, w) float64 map at latent resolution, nats per latent pixel.
        stderr: standard error of ``value`` (conservative; see :class:`InformationEstimate`).
        prompt, words, context: what was measured (``context`` None = unconditional).
        conditions: the (low, high) conditions compared (texts, or masked captions for embedding removal).
        num_samples, loc, scale, clip, seed, removal: how.
        unet_evals: UNet evaluations spent (exactly ``2 * num_samples``).
        image_size: (height, width) in pixels of the analysed image.
    """

    value: float
    pixel_map: torch.Tensor
    stderr: float
    prompt: str
    words: list[str]
    context: list[str] | None
    conditions: list[str]
    num_samples: int
    loc: float
    scale: float
    clip: float
    seed: int
    removal: str
    unet_evals: int
    image_size: tuple[int, int]

    def image_map(self, mode: str = "bilinear") -> torch.Tensor:
        """(height, width) map at image resolution, nats per image pixel (latent value / pixels per latent)."""
        return _upsample(self.pixel_map, self.image_size, mode)

    def to_dict(self) -> dict:
        """JSON-safe summary (no maps)."""
        return {"value": self.value, "stderr": self.stderr, "prompt": self.prompt, "words": self.words,
                "context": self.context, "conditions": self.conditions, "num_samples": self.num_samples,
                "loc": self.loc, "scale": self.scale, "clip": self.clip, "seed": self.seed,
                "removal": self.removal, "unet_evals": self.unet_evals, "image_size": list(self.image_size),
                "map_size": list(self.pixel_map.shape)}


def _upsample(m: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    h, w = m.shape
    out = F.interpolate(m[None, None].double(), size=tuple(size), mode=mode,
                        **({} if mode == "nearest" else {"align_corners": False}))[0, 0]
    return out * (h * w) / (size[0] * size[1])


def information(xp, image_or_latent, prompt: str, words: str | Sequence[str] | None = None,
                context: str | Sequence[str] | None = "rest", num_samples: int = DEFAULT_NUM_SAMPLES,
                loc: float = DEFAULT_LOC, scale: float = DEFAULT_SCALE, clip: float = DEFAULT_CLIP,
                seed: int = 0, batch_size: int | None = None, removal: str = "string",
                progress: bool = True) -> InformationResult:
    """Orthogonal pointwise (conditional) mutual information between words and an image.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        image_or_latent: a PIL RGB image, a uint8 (H, W, 3) array, a (1, 3, H, W) tensor in [-1, 1], or
            a (1, C, h, w) latent (as from ``xp.encode_image``).
        prompt: the image's caption.
        words: word(s) or phrase(s) of ``prompt`` whose information is measured (all their
            occurrences); None = the whole prompt (then there is no context left: unconditional).
        context: what the words are conditioned on: ``"rest"`` (default) = every other word of the
            prompt, i.e. ``i(x; words | rest)``; a word or list of words of the prompt; or None for the
            unconditional ``i(x; words)`` (the words alone against the empty prompt).
        num_samples: ``N`` (logSNR, noise) samples; costs exactly ``2N`` UNet evaluations.
        loc, scale, clip: logistic importance sampling of logSNR (reference defaults 1, 2, 3).
        seed: seeds the logSNRs and noise.
        batch_size: most rows per UNet call (default ``xp.batch_size``).
        removal: ``"string"`` (delete the words from the caption, re-encode) or ``"embedding"``.
        progress: tqdm bar.
    """
    validate_prompt(prompt)
    validate_integration(num_samples, loc, scale, clip)
    tok = xp.pipe.tokenizer
    n_words = len(split_words(prompt))
    if words is None:
        if context not in (None, "rest"):
            raise ValueError("context must be None or 'rest' when words is None (the whole prompt)")
        y = set(range(n_words))
        word_list, ctx, ctx_list = [prompt], set(), None
    else:
        word_list = _as_word_list(words, "words")
        groups = {f"words entry {w!r} (#{i})": _word_indices(tok, prompt, w) for i, w in enumerate(word_list)}
        _check_disjoint(groups, prompt)
        y = set().union(*map(set, groups.values()))
        if context is None:
            ctx, ctx_list = set(), None
        elif isinstance(context, str) and context == "rest":
            ctx = set(range(n_words)) - y
            ctx_list = [split_words(prompt)[i] for i in sorted(ctx)]
        else:
            if (isinstance(context, str) and not context.strip()) or (not isinstance(context, str)
                                                                      and len(list(context)) == 0):
                raise ValueError(f"context {context!r} is empty; use context=None for the unconditional "
                                 f"information, 'rest' for the rest of the prompt, or words of the prompt")
            ctx_list = _as_word_list(context, "context")
            cg = {f"context word {w!r}": _word_indices(tok, prompt, w) for w in ctx_list}
            _check_disjoint({**cg, "words": sorted(y)}, prompt)
            ctx = set().union(*map(set, cg.values()))
    conds = _build_conditions(xp, prompt, [ctx, ctx | y], removal)
    latent, image = _latent_of(xp, image_or_latent)
    evals0 = xp.unet_evals
    bs = batch_size or xp.batch_size
    est = estimate_information(model_eps_fn(xp, conds.embeddings, bs), latent, 2, [(1, 0)], num_samples, loc,
                               scale, clip, _generator(seed), snap_to_timesteps(xp),
                               samples_per_call=max(1, bs // 2), progress=progress)
    f = xp.vae_scale_factor
    size = image.size[::-1] if image is not None else (latent.shape[-2] * f, latent.shape[-1] * f)
    return InformationResult(
        value=float(est.values[0]), pixel_map=est.maps[0], stderr=float(est.stderr[0]), prompt=prompt,
        words=word_list, context=ctx_list, conditions=conds.labels, num_samples=int(num_samples), loc=float(loc),
        scale=float(scale), clip=float(clip), seed=int(seed), removal=removal,
        unet_evals=xp.unet_evals - evals0, image_size=tuple(size))


# ============================================================================ PID on a pipeline
@dataclass
class PIDResult:
    """Pointwise partial information decomposition of two words about an image.

    Attributes:
        maps: (7, h, w) float64 pixel maps at latent resolution, nats per latent pixel, in the order
            :data:`PID_TERMS` = I1, I2, I12, R, U1, U2, S. Image-level values are their sums
            (attributes ``.I1`` ... ``.S``).
        image: the analysed image (PIL).
        prompt: the caption (None for an unconditional PID of a user image given without one).
        word1, word2: the pair.
        conditional: True = every term conditioned on the rest of the prompt.
        conditions: the four conditions c, c+y1, c+y2, c+y1+y2 (texts, or masked captions).
        redundancy: name of the redundancy measure.
        stderr: standard errors of the image-level I1, I2, I12.
        num_samples, loc, scale, clip, seed, removal: how.
        unet_evals: UNet evaluations of the analysis (exactly ``4 * num_samples``);
        generation_evals: those spent generating the image (0 for a given image).
        seconds: wall time of the analysis.
    """

    maps: torch.Tensor
    image: Image.Image = field(repr=False)
    prompt: str | None
    word1: str
    word2: str
    conditional: bool
    conditions: list[str]
    redundancy: str
    stderr: dict[str, float]
    num_samples: int
    loc: float
    scale: float
    clip: float
    seed: int
    removal: str
    unet_evals: int
    generation_evals: int = 0
    seconds: float = 0.0

    def __post_init__(self):
        for name in PID_TERMS:  # scalar attributes .I1 ... .S
            object.__setattr__(self, name, float(self.map(name).sum()))

    def map(self, name: str) -> torch.Tensor:
        """(h, w) latent-resolution map of a term (``"I1"``, ..., ``"S"``)."""
        if name not in PID_TERMS:
            raise ValueError(f"unknown PID term {name!r}; allowed: {', '.join(PID_TERMS)}")
        return self.maps[PID_TERMS.index(name)]

    def image_map(self, name: str, mode: str = "bilinear") -> torch.Tensor:
        """(height, width) map at image resolution, nats per image pixel."""
        return _upsample(self.map(name), self.image.size[::-1], mode)

    @property
    def scalars(self) -> dict[str, float]:
        """Image-level I1, I2, I12, R, U1, U2, S in nats."""
        return {k: getattr(self, k) for k in PID_TERMS}

    def label(self, name: str) -> str:
        """Readable name of a term, e.g. ``I(red)``, ``R(red, circle)``."""
        a, b = self.word1, self.word2
        return {"I1": f"I({a})", "I2": f"I({b})", "I12": f"I({a}, {b})", "R": f"R({a}, {b})",
                "U1": f"U({a})", "U2": f"U({b})", "S": f"S({a}, {b})"}[name]

    # ---------------------------------------------------------------- plots
    def plot(self, terms: Sequence[str] = ("R", "U1", "U2", "S", "I1", "I2"), alpha: float = 0.6):
        """2x3 matplotlib figure: each term's image-resolution map over the image (nonnegative maps
        in 'inferno' from 0 to their max, signed maps in 'coolwarm' symmetric about 0)."""
        import matplotlib.pyplot as plt

        terms = list(terms)
        if len(terms) != 6:
            raise ValueError(f"plot shows 6 terms (2x3), got {len(terms)}: {terms}")
        fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.6))
        base = np.asarray(self.image.convert("RGB"))
        for ax, name in zip(axes.flat, terms):
            m = self.image_map(name).numpy()
            ax.imshow(base)
            if m.min() < 0:
                lim = max(abs(m.min()), abs(m.max()), 1e-12)
                im = ax.imshow(m, cmap="coolwarm", vmin=-lim, vmax=lim, alpha=alpha)
            else:
                im = ax.imshow(m, cmap="inferno", vmin=0, vmax=max(m.max(), 1e-12), alpha=alpha)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{self.label(name)} = {getattr(self, name):.3g}", fontsize=9)
            ax.axis("off")
        kind = "conditional PID" if self.conditional else "PID"
        fig.suptitle(f"{kind} of '{self.word1}', '{self.word2}'" + (f" in '{self.prompt}'" if self.prompt else "")
                     + f"   (nats; I12 = {self.I12:.3g})", fontsize=10)
        fig.tight_layout()
        return fig

    def plot_bars(self):
        """Bar chart of the seven image-level terms (nats), I-terms with their standard errors."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.4))
        vals = [getattr(self, k) for k in PID_TERMS]
        errs = [self.stderr.get(k, 0.0) for k in PID_TERMS]
        colors = ["#4c72b0", "#4c72b0", "#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2"]
        ax.bar([self.label(k) for k in PID_TERMS], vals, yerr=errs, color=colors, capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("nats")
        ax.set_title(("conditional " if self.conditional else "") + f"PID, N={self.num_samples}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        """JSON-safe metadata and scalars (no maps)."""
        return {"scalars": self.scalars, "stderr": self.stderr, "prompt": self.prompt, "word1": self.word1,
                "word2": self.word2, "conditional": self.conditional, "conditions": self.conditions,
                "redundancy": self.redundancy, "num_samples": self.num_samples, "loc": self.loc,
                "scale": self.scale, "clip": self.clip, "seed": self.seed, "removal": self.removal,
                "unet_evals": self.unet_evals, "generation_evals": self.generation_evals,
                "seconds": self.seconds, "map_size": list(self.maps.shape[-2:]),
                "image_size": list(self.image.size[::-1])}

    def save(self, folder: str | Path) -> Path:
        """Write maps (safetensors), metadata (JSON) and the image (PNG) into ``folder``."""
        folder = Path(folder)
        meta = self.to_dict()
        save_result(folder, {"maps": self.maps}, meta, kind="pid")
        self.image.save(folder / "image.png")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> PIDResult:
        folder = Path(folder)
        tensors, m = load_result(folder, "pid")
        image = Image.open(folder / "image.png").convert("RGB")
        return cls(maps=tensors["maps"], image=image, prompt=m["prompt"], word1=m["word1"], word2=m["word2"],
                   conditional=m["conditional"], conditions=m["conditions"], redundancy=m["redundancy"],
                   stderr=m["stderr"], num_samples=m["num_samples"], loc=m["loc"], scale=m["scale"],
                   clip=m["clip"], seed=m["seed"], removal=m["removal"], unet_evals=m["unet_evals"],
                   generation_evals=m["generation_evals"], seconds=m["seconds"])


def pid(xp, image_or_prompt, word1: str, word2: str, prompt: str | None = None, conditional: bool = True,
        redundancy: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "min",
        num_samples: int = DEFAULT_NUM_SAMPLES, loc: float = DEFAULT_LOC, scale: float = DEFAULT_SCALE,
        clip: float = DEFAULT_CLIP, seed: int = 0, batch_size: int | None = None, removal: str = "string",
        num_inference_steps: int | None = None, guidance_scale: float | None = None,
        height: int | None = None, width: int | None = None, progress: bool = True) -> PIDResult:
    """DiffusionPID of two words about an image: redundancy, uniquenesses and synergy, as pixel maps.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        image_or_prompt: a prompt (the image is generated with ``xp.generate(prompt, seed=seed, ...)`` and
            analysed), or an image / latent as for :func:`information` (then give ``prompt``).
        word1, word2: two different words (or phrases) of the prompt.
        prompt: the caption of a given image (ignored, and must match, when ``image_or_prompt`` is a prompt).
        conditional: condition every term on the rest of the prompt (default). With False the
            conditions are ``""``, ``y1``, ``y2``, ``"y1 y2"``; the words then need not be in the prompt,
            which only serves to generate the image, and a given image needs no prompt.
        redundancy: ``"min"`` (pointwise minimum per latent pixel) or a callable ``(i1_map, i2_map) -> r_map``.
        num_samples: ``N`` (logSNR, noise) samples; exactly ``4N`` UNet evaluations, the four conditions of a
            sample in one batched :meth:`predict_noise` call.
        loc, scale, clip: logistic importance sampling of logSNR (reference defaults 1, 2, 3).
        seed: seeds generation (when given a prompt) and the logSNR/noise samples.
        batch_size: most rows per UNet call (default ``xp.batch_size``).
        removal: ``"string"`` or ``"embedding"`` (see the module docstring).
        num_inference_steps, guidance_scale, height, width: generation settings (prompt input only).
        progress: tqdm bars.
    """
    validate_integration(num_samples, loc, scale, clip)
    rname, _ = _redundancy_fn(redundancy)
    if removal not in REMOVALS:
        raise ValueError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    generated = isinstance(image_or_prompt, str)
    if generated:
        if prompt is not None and prompt != image_or_prompt:
            raise ValueError(f"got the prompt twice and different: {image_or_prompt!r} and prompt={prompt!r}")
        prompt = validate_prompt(image_or_prompt)
    elif prompt is not None:
        validate_prompt(prompt)
    for name, w in (("word1", word1), ("word2", word2)):
        if not isinstance(w, str) or not split_words(w):
            raise ValueError(f"{name} must be a non-empty word, got {w!r}")
    tok = xp.pipe.tokenizer
    if conditional:
        if prompt is None:
            raise ValueError("a conditional PID of a given image needs its caption: pass prompt=...")
        i1, i2 = _word_indices(tok, prompt, word1), _word_indices(tok, prompt, word2)
        if split_words(word1) == split_words(word2):
            raise ValueError(f"word1 and word2 are the same word {word1!r}; give two different words")
        _check_disjoint({f"word1 {word1!r}": i1, f"word2 {word2!r}": i2}, prompt)
        base, y1, y2 = prompt, set(i1), set(i2)
        c = set(range(len(split_words(prompt)))) - y1 - y2
    else:
        w1, w2 = split_words(word1), split_words(word2)
        if w1 == w2:
            raise ValueError(f"word1 and word2 are the same word {word1!r}; give two different words")
        base = " ".join(w1 + w2)
        y1, y2, c = set(range(len(w1))), set(range(len(w1), len(w1) + len(w2))), set()
    conds = _build_conditions(xp, base, [c, c | y1, c | y2, c | y1 | y2], removal)

    gen_evals = 0
    if generated:
        e0 = xp.unet_evals
        image = xp.generate(prompt, seed=seed, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=height, width=width, progress=progress).images[0]
        gen_evals = xp.unet_evals - e0
        latent = xp.encode_image(image)
    else:
        latent, image = _latent_of(xp, image_or_prompt)
        if image is None:
            image = xp.decode_latents(latent)[0]

    t0 = time.perf_counter()
    evals0 = xp.unet_evals
    bs = batch_size or xp.batch_size
    est = estimate_information(model_eps_fn(xp, conds.embeddings, bs), latent, 4, [(1, 0), (2, 0), (3, 0)],
                               num_samples, loc, scale, clip, _generator(seed), snap_to_timesteps(xp),
                               samples_per_call=max(1, bs // 4), progress=progress)
    if xp.device.type == "cuda":
        torch.cuda.synchronize(xp.device)
    seconds = time.perf_counter() - t0
    terms = pid_maps(est.maps[0], est.maps[1], est.maps[2], redundancy)
    se = est.stderr
    return PIDResult(
        maps=torch.stack([terms[k] for k in PID_TERMS]), image=image, prompt=prompt, word1=word1, word2=word2,
        conditional=bool(conditional), conditions=conds.labels, redundancy=rname,
        stderr={"I1": float(se[0]), "I2": float(se[1]), "I12": float(se[2])}, num_samples=int(num_samples),
        loc=float(loc), scale=float(scale), clip=float(clip), seed=int(seed), removal=removal,
        unet_evals=xp.unet_evals - evals0, generation_evals=gen_evals, seconds=seconds)


# ============================================================================ CLI
def register(subparsers) -> None:
    """Add ``diffusion-xai pid "prompt" --pair red,circle --out DIR`` to the CLI's subparsers."""
    p = subparsers.add_parser("pid", help="DiffusionPID maps (redundancy, uniqueness, synergy) of a word pair")
    p.add_argument("prompt")
    p.add_argument("--pair", required=True, help="two comma-separated words of the prompt, e.g. red,circle")
    p.add_argument("--unconditional", action="store_true",
                   help="do not condition on the rest of the prompt (default: conditional PID)")
    p.add_argument("--samples", type=int, default=DEFAULT_NUM_SAMPLES, help="(logSNR, noise) samples N; 4N UNet evals")
    p.add_argument("--removal", choices=REMOVALS, default="string")
    p.add_argument("--loc", type=float, default=DEFAULT_LOC)
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE)
    p.add_argument("--clip", type=float, default=DEFAULT_CLIP)
    p.add_argument("--batch-size", type=int, default=None, help="rows per UNet call")
    from .cli import add_common_options, add_generation_options

    add_generation_options(p)
    add_common_options(p)
    p.set_defaults(func=cmd_pid)


def cmd_pid(a) -> int:
    """Run the ``pid`` subcommand: writes result/, image.png, pid_maps.png, pid_bars.png, pid.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cli import load_model

    pair = [w.strip() for w in a.pair.split(",") if w.strip()]
    if len(pair) != 2:
        raise ValueError(f"--pair must be two comma-separated words, e.g. red,circle; got {a.pair!r}")
    xp = load_model(a.model, a.device)
    res = pid(xp, a.prompt, pair[0], pair[1], conditional=not a.unconditional, num_samples=a.samples,
              loc=a.loc, scale=a.scale, clip=a.clip, seed=a.seed, batch_size=a.batch_size, removal=a.removal,
              num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height, width=a.width)
    out = Path(a.out)
    res.save(out / "result")
    files = [str(out / "image.png"), str(out / "pid_maps.png"), str(out / "pid_bars.png")]
    res.image.save(files[0])
    for fig, path in ((res.plot(), files[1]), (res.plot_bars(), files[2])):
        fig.savefig(path, dpi=120)
        plt.close(fig)
    summary = {**res.to_dict(), "files": files, "model": a.model}
    (out / "pid.json").write_text(json.dumps(summary, indent=2))
    for k in PID_TERMS:
        print(f"{res.label(k):>24s} = {getattr(res, k): .4f} nats")
    print(f"{res.unet_evals} UNet evals in {res.seconds:.1f} s; wrote {len(files)} images and {out / 'pid.json'}")
    return 0


__all__ = ["PID_TERMS", "REDUNDANCIES", "InformationEstimate", "InformationResult", "PIDResult",
           "estimate_information", "information", "logistic_logsnr", "model_eps_fn", "pid", "pid_maps",
           "pointwise_min", "register", "snap_to_timesteps"]
