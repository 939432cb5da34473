"""Text-embedding tweaks (Multi-Concept T2I-Zero, Tunanyan et al. 2023) and embedding-level prompt edits.

A *tweak* is a small object that changes how a prompt conditions a generation, without touching any
weight. :func:`generate_with_tweaks` (``xp.generate(prompt, tweaks=[...])``) applies a list of them:

Embedding tweaks change the conditional text embeddings ``E`` (L x D per prompt: L = 77 token
positions, BOS at 0; D = the text width, for SDXL the two encoders' outputs concatenated) before
denoising:

* :class:`CorrectionBySimilarities` (CBS) -- for each token c of a concept word, with window
  W = the prompt tokens within +/- ``gamma`` positions of c (never BOS, EOS or padding; c included):
  ``S_i = f_c * f_i`` (elementwise, i in W); entries of S at or below the ``threshold`` quantile of
  S's entries are set to 0; S is divided by its maximum; then
  ``f_c <- (1 - alpha) f_c + alpha * sum_i S_i * f_i``. For SDXL the quantile, the maximum and the
  update are taken per encoder block of the width (the two encoders' features have other scales).
  If S has no positive kept entry the token is left as it is. All concept tokens of one CBS tweak are
  corrected from the same input embeddings (simultaneously).
* :class:`Reweight` -- ``f_w <- factor * f_w`` at every token of the word.
* :class:`Remove` -- ``f_w <- (1 - alpha) f_w + alpha * e_w``, where ``e_w`` is the text encoder's
  output for the *empty prompt* ``""`` at the same positions (``xp.encode_prompt("")``: BOS followed
  by EOS/padding embeddings; the same convention as ``information(..., removal="embedding")``).
  Positions are kept: every other token, including those after the word that the causal text
  encoder let see it, keeps the full prompt's embedding. ``alpha = 1`` (default) replaces exactly.
* :class:`Swap` -- ``f_w <- (1 - alpha) f_w + alpha * g_w``, where ``g_w`` is the embedding at the same
  positions of the prompt with the word replaced by ``other`` in the text (so ``other`` is encoded
  in the same left context). ``other`` must tokenise into as many tokens as the word. Other
  positions keep the original prompt's embeddings.
* :class:`Interpolate` -- ``f_w <- (1 - t) f_w + t * g_w`` with ``g_w`` as for :class:`Swap`.

Attention tweaks act inside the UNet's cross-attention layers through an
:class:`~diffusion_xai.hooks.AttentionEditor`:

* :class:`CrossTokenNMS` -- in each cross-attention layer and each conditional row, token k's
  contribution to query q is ``p[h, q, k] v[k, h]`` (attention probability times value, per head h);
  its contribution map is the norm of that vector over heads, ``m_k(q) = sqrt(sum_h p[h,q,k]^2
  |v[k,h]|^2)``, smoothed spatially with a 3x3 Gaussian (``sigma``, replicate padding). At every
  pixel only the selected token with the largest smoothed map keeps its contribution; the other
  selected tokens' contributions are suppressed (tokens that are not selected -- BOS, EOS,
  padding, unselected words -- always keep theirs). The layer output becomes
  ``(1 - alpha) out + alpha suppressed``, i.e. ``out - alpha * W_out(sum_{k suppressed} p v) /
  rescale`` (the output projection's bias cancels in the blend).

Scope and order (documented contract):

* Tweaks apply to the **conditional** branch only: the unconditional / negative embeddings are what
  the pipeline makes of ``negative_prompt`` (untouched), and CrossTokenNMS edits only the rows of
  ``ctx.cond_slice()``. SDXL's pooled embedding (one vector per prompt, no token positions) is left
  as the prompt's own for every tweak.
* A word (token position) may be written by at most one embedding tweak (CBS writes its concept
  tokens); overlapping targets raise. At most one CrossTokenNMS per call.
* Reweight, Remove, Swap and Interpolate read only their own positions and the encoder's output
  for fixed texts, so their order never matters. CBS reads the neighbours in its window as the
  tweaks *before it in the list* left them: the order of a CBS and a tweak on a word within its
  window matters (and of two CBS tweaks whose windows hold each other's concepts). Attention
  tweaks commute with embedding tweaks (they act on the UNet, after the embeddings are fixed).
* Nothing is left behind: embeddings are edited on copies (the encode cache is never written),
  and the attention hooks are removed when the call ends, also after an exception.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hooks import AttentionEditor, CallContext
from .hooks.manager import spatial_shape
from .pipeline import PromptEmbeddings
from .tokens import check_same_positions, find_word, split_words, validate_prompt, word_tokens

__all__ = ["CorrectionBySimilarities", "CrossTokenNMS", "EmbeddingTweak", "Interpolate", "Remove", "Reweight",
           "Swap", "Tweak", "correct_by_similarities", "gaussian_kernel", "generate_with_tweaks",
           "nms_suppressed_mask", "tweak_embeddings"]

_RESERVED = ("prompt", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
             "negative_pooled_prompt_embeds", "prompt_2")


# --------------------------------------------------------------------------------------------- validation


def _unit(name: str, value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _word(name: str, value, owner: str) -> str:
    if not isinstance(value, str) or not split_words(value):
        raise ValueError(f"{owner}: {name} must be a non-empty word, got {value!r}")
    return value


def _occurrence(value, owner: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{owner}: occurrence must be None (every occurrence) or an int >= 0, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- prompt context


class _PromptContext:
    """What an embedding tweak needs about one prompt: word positions, fixed-text encodings, widths."""

    def __init__(self, xp, prompt: str):
        self.xp = xp
        self.prompt = validate_prompt(prompt)
        tok = xp.pipe.tokenizer
        if xp.is_sdxl and len(xp.tokenizers) > 1:
            check_same_positions(xp.tokenizers, prompt)
        self.words = word_tokens(tok, prompt)
        self.L = int(tok.model_max_length)
        # positions 1..last hold the prompt's tokens (EOS follows); truncated tokens are dropped
        self.last = min(sum(len(w.positions) for w in self.words), self.L - 2)
        self.segments = _segments(xp)

    def positions(self, word: str, occurrence: int | None = None) -> list[int]:
        return find_word(self.xp.pipe.tokenizer, self.prompt, word, occurrence)

    def encode(self, text: str) -> torch.Tensor:
        """(L, D) text-encoder output for ``text`` (cached by the wrapper; never written to)."""
        return self.xp.encode_prompt(text).embeds[0]

    def replaced_prompt(self, word: str, other: str, occurrence: int | None, owner: str) -> str:
        """The prompt with ``word`` (the selected occurrences) replaced by ``other``; same token count."""
        words = [w.word for w in self.words]
        phrase, repl = split_words(word), split_words(other)
        starts, i = [], 0
        while i + len(phrase) <= len(words):
            if words[i:i + len(phrase)] == phrase:
                starts.append(i)
                i += len(phrase)
            else:
                i += 1
        if occurrence is not None:
            starts = [starts[occurrence]]  # range already checked by find_word
        tok = self.xp.pipe.tokenizer
        n_word = len(tok(" ".join(phrase), add_special_tokens=False).input_ids)
        n_other = len(tok(" ".join(repl), add_special_tokens=False).input_ids)
        if n_word != n_other:
            raise ValueError(f"{owner}: {other!r} tokenises into {n_other} token(s) but {word!r} into {n_word}; "
                             f"an embedding-level swap keeps positions, so both must have the same count")
        out: list[str] = []
        i = 0
        while i < len(words):
            if i in starts:
                out += repl
                i += len(phrase)
            else:
                out.append(words[i])
                i += 1
        return " ".join(out)


def _segments(xp) -> list[tuple[int, int]]:
    """Column blocks of the embedding width: one per text encoder (SDXL: [encoder 1 | encoder 2])."""
    pipe = xp.pipe
    widths = []
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            widths.append(int(enc.config.hidden_size))
    D = int(xp.unet.config.cross_attention_dim)
    if not xp.is_sdxl or sum(widths) != D:
        widths = [D]
    out, start = [], 0
    for w in widths:
        out.append((start, start + w))
        start += w
    return out


# --------------------------------------------------------------------------------------------- tweaks


class Tweak:
    """Base class of all tweaks (embedding or attention)."""

    def _name(self) -> str:
        return type(self).__name__


class EmbeddingTweak(Tweak):
    """A tweak that edits the conditional token embeddings of a prompt before denoising."""

    def targets(self, pc: _PromptContext) -> list[int]:
        """Token positions this tweak writes (raises ValueError for words not in the prompt)."""
        raise NotImplementedError

    def apply(self, embeds: torch.Tensor, pc: _PromptContext) -> torch.Tensor:
        """(L, D) embeddings -> (L, D) edited copy (or ``embeds`` itself when the tweak is neutral)."""
        raise NotImplementedError


def _blend(embeds: torch.Tensor, pos: list[int], target: torch.Tensor, alpha: float) -> torch.Tensor:
    """Copy of ``embeds`` with rows ``pos`` <- (1 - alpha) rows + alpha target rows (exact at 0 and 1)."""
    if alpha == 0.0 or not pos:
        return embeds
    out = embeds.clone()
    tgt = target[pos].to(embeds.device, embeds.dtype)
    out[pos] = tgt if alpha == 1.0 else ((1 - alpha) * embeds[pos].double() + alpha * tgt.double()).to(embeds.dtype)
    return out


@dataclass(frozen=True)
class Reweight(EmbeddingTweak):
    """Scale a word's token embeddings: ``f_w <- factor * f_w`` (``factor = 1`` changes nothing).

    Args:
        word: a word or phrase of the prompt (case-insensitive).
        factor: finite multiplier (0 zeroes the tokens; > 1 emphasises, < 1 de-emphasises).
        occurrence: which occurrence (0 = first); None = every occurrence.
    """

    word: str
    factor: float
    occurrence: int | None = None

    def __post_init__(self):
        _word("word", self.word, "Reweight")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
            raise ValueError(f"Reweight: factor must be a finite number, got {self.factor!r}")
        _occurrence(self.occurrence, "Reweight")

    def targets(self, pc):
        return pc.positions(self.word, self.occurrence)

    def apply(self, embeds, pc):
        if self.factor == 1.0:
            return embeds
        pos = self.targets(pc)
        out = embeds.clone()
        out[pos] = (embeds[pos].double() * float(self.factor)).to(embeds.dtype)
        return out


@dataclass(frozen=True)
class Remove(EmbeddingTweak):
    """Replace a word's token embeddings by the empty prompt's embeddings at the same positions.

    ``f_w <- (1 - alpha) f_w + alpha * E("")[w]`` (``alpha = 1``: exact replacement). Positions are
    kept; every other token keeps the full prompt's embedding (see the module docstring).
    """

    word: str
    alpha: float = 1.0
    occurrence: int | None = None

    def __post_init__(self):
        _word("word", self.word, "Remove")
        _unit("alpha", self.alpha, "Remove")
        _occurrence(self.occurrence, "Remove")

    def targets(self, pc):
        return pc.positions(self.word, self.occurrence)

    def apply(self, embeds, pc):
        return _blend(embeds, self.targets(pc), pc.encode(""), float(self.alpha))


@dataclass(frozen=True)
class Interpolate(EmbeddingTweak):
    """Move a word's token embeddings towards another word's: ``f_w <- (1 - t) f_w + t g_w``.

    ``g_w``: the embeddings at the same positions of the prompt with ``word`` replaced by ``other`` in
    the text (``other`` needs the same number of tokens). ``t = 0`` changes nothing, ``t = 1`` swaps.
    """

    word: str
    other: str
    t: float
    occurrence: int | None = None

    def __post_init__(self):
        _word("word", self.word, self._name())
        _word("other", self.other, self._name())
        _unit("t" if type(self) is Interpolate else "alpha", self.t, self._name())
        _occurrence(self.occurrence, self._name())

    def targets(self, pc):
        return pc.positions(self.word, self.occurrence)

    def apply(self, embeds, pc):
        pos = self.targets(pc)
        if float(self.t) == 0.0:
            return embeds
        text = pc.replaced_prompt(self.word, self.other, self.occurrence, self._name())
        return _blend(embeds, pos, pc.encode(text), float(self.t))


class Swap(Interpolate):
    """Replace a word's token embeddings by another word's (``Interpolate`` with ``t = alpha``).

    ``Swap(word, other_word, alpha=1.0)``: ``f_w <- (1 - alpha) f_w + alpha g_w``, ``g_w`` as in
    :class:`Interpolate` (the other word encoded in the prompt's own left context).
    """

    def __init__(self, word: str, other_word: str, alpha: float = 1.0, occurrence: int | None = None):
        super().__init__(word, other_word, alpha, occurrence)

    @property
    def alpha(self) -> float:
        return float(self.t)

    def __repr__(self) -> str:
        return f"Swap(word={self.word!r}, other_word={self.other!r}, alpha={self.t!r}, occurrence={self.occurrence!r})"


def correct_by_similarities(embeds: torch.Tensor, positions: Sequence[int], last: int, alpha: float = 0.25,
                            gamma: int = 2, threshold: float = 0.5,
                            segments: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Correction by Similarities on one prompt's embeddings (see the module docstring).

    Args:
        embeds: (L, D) token embeddings (position 0 = BOS).
        positions: the concept token positions to correct (each in 1..last).
        last: the last prompt-token position (the window never reaches past it, nor BOS).
        alpha: blend weight in [0, 1]; gamma: window half-width in tokens; threshold: quantile in [0, 1).
        segments: column blocks [(start, end), ...] treated separately (default: the whole width).
    Returns:
        (L, D) corrected copy in ``embeds``' dtype (``embeds`` itself when ``alpha == 0``), computed
        in float64 from the input (all concept tokens corrected simultaneously).
    """
    if alpha == 0.0 or not positions:
        return embeds
    segments = list(segments) if segments is not None else [(0, embeds.shape[-1])]
    E = embeds.double()
    out = E.clone()
    for c in positions:
        if not 1 <= c <= last:
            raise ValueError(f"concept position {c} is outside the prompt tokens 1..{last}")
        window = list(range(max(1, c - gamma), min(last, c + gamma) + 1))
        Fw = E[window]
        for a, b in segments:
            f_c = E[c, a:b]
            S = f_c[None] * Fw[:, a:b]  # (w, d)
            q = torch.quantile(S.flatten(), threshold)
            S = torch.where(S > q, S, torch.zeros_like(S))
            m = S.max()
            if not m > 0:
                continue
            S = S / m
            out[c, a:b] = (1 - alpha) * f_c + alpha * (S * Fw[:, a:b]).sum(0)
    return out.to(embeds.dtype)


@dataclass(frozen=True)
class CorrectionBySimilarities(EmbeddingTweak):
    """Correction by Similarities (T2I-Zero): mix each concept token with its similar neighbours.

    Args:
        words: the concept words whose tokens are corrected (a string or a list of strings).
        alpha: blend weight in [0, 1] (0 changes nothing). gamma: window half-width (tokens, >= 0).
        threshold: quantile in [0, 1) of the similarity entries below which they are dropped.
    """

    words: tuple[str, ...]
    alpha: float = 0.25
    gamma: int = 2
    threshold: float = 0.5

    def __init__(self, words: str | Sequence[str], alpha: float = 0.25, gamma: int = 2, threshold: float = 0.5):
        ws = (words,) if isinstance(words, str) else tuple(words)
        if not ws:
            raise ValueError("CorrectionBySimilarities: give at least one concept word")
        for w in ws:
            _word("words", w, "CorrectionBySimilarities")
        object.__setattr__(self, "words", ws)
        object.__setattr__(self, "alpha", _unit("alpha", alpha, "CorrectionBySimilarities"))
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0:
            raise ValueError(f"CorrectionBySimilarities: gamma must be an int >= 0, got {gamma!r}")
        object.__setattr__(self, "gamma", gamma)
        th = _unit("threshold", threshold, "CorrectionBySimilarities")
        if th == 1.0:
            raise ValueError("CorrectionBySimilarities: threshold must be in [0, 1), got 1.0 (it would drop every "
                             "similarity)")
        object.__setattr__(self, "threshold", th)

    def targets(self, pc):
        return sorted({p for w in self.words for p in pc.positions(w)})

    def apply(self, embeds, pc):
        pos = [p for p in self.targets(pc) if p <= pc.last]
        return correct_by_similarities(embeds, pos, pc.last, self.alpha, self.gamma, self.threshold, pc.segments)


# --------------------------------------------------------------------------------------------- cross-token NMS


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """3x3 Gaussian kernel with standard deviation ``sigma`` (pixels), summing to 1; sigma 0 = identity."""
    if sigma == 0:
        k = torch.zeros(3, 3, dtype=torch.float64)
        k[1, 1] = 1.0
        return k
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def nms_suppressed_mask(maps: torch.Tensor, selected: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Which (query, token) contributions cross-token NMS suppresses.

    Args:
        maps: (n, K, h, w) non-negative contribution maps per token.
        selected: (n, K) bool, the tokens that compete (each row needs at least one).
        sigma: the 3x3 Gaussian's sigma (0 = no smoothing).
    Returns:
        (n, h*w, K) bool: True where a selected token is not the arg-max of the smoothed maps among
        the selected tokens at that pixel (ties go to the lowest position).
    """
    n, K, h, w = maps.shape
    k = gaussian_kernel(sigma).to(maps.device, maps.dtype)[None, None]
    sm = F.conv2d(F.pad(maps.reshape(n * K, 1, h, w), (1, 1, 1, 1), mode="replicate"), k).reshape(n, K, h * w)
    sm = sm.transpose(1, 2).masked_fill(~selected[:, None, :], float("-inf"))  # (n, Q, K)
    winner = sm.argmax(-1)  # (n, Q)
    keys = torch.arange(K, device=maps.device)
    return selected[:, None, :] & (keys[None, None, :] != winner[..., None])


class _NMSEditor(AttentionEditor):
    """The AttentionEditor hook that performs cross-token NMS on the conditional rows of a generation.

    It reads the attention probabilities (computed beside the layer's own fast path, so the
    unconditional rows stay bit-identical) and the values of the text tokens (``to_v`` of the
    ``encoder_hidden_states`` the layer receives, captured by a forward pre-hook), then edits the
    layer's output.
    """

    reads_probs = True

    def __init__(self, selected: torch.Tensor, images_per_prompt: int, alpha: float, sigma: float,
                 until_step: int | None):
        super().__init__(self._edit, kind="output", cross=True)
        self.selected_tokens = selected  # (prompts, K) bool
        self.images_per_prompt = images_per_prompt
        self.alpha = alpha
        self.sigma = sigma
        self.until_step = until_step
        self._modules: dict[str, torch.nn.Module] = {}
        self._context: dict[str, torch.Tensor] = {}
        self._probs: dict[str, torch.Tensor] = {}

    def bind(self, unet, processor_keys):
        super().bind(unet, processor_keys)
        mods = dict(unet.named_modules())
        self._modules = {n: mods[n] for n in self.selected}

    def install(self, unet, manager) -> list:
        handles = []
        for name, mod in self._modules.items():
            def pre(module, args, kwargs, _name=name):
                ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                if ehs is not None:
                    self._context[_name] = ehs
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        return handles

    def wants(self, processor_key, is_cross, ctx):
        if not is_cross or not super().wants(processor_key, is_cross, ctx):
            return False
        return self.until_step is None or ctx.step < self.until_step

    def on_probs(self, processor_key, probs, ctx):
        from .hooks.attention import layer_name

        self._probs[layer_name(processor_key)] = probs

    def _edit(self, layer: str, out: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        probs, ehs = self._probs.pop(layer), self._context.pop(layer)
        if out.ndim != 3:
            raise RuntimeError(f"cross-token NMS expects (batch, queries, channels) outputs, got {tuple(out.shape)} "
                               f"in layer {layer}")
        cond = ctx.cond_slice()
        n = cond.stop - cond.start
        n_img = self.selected_tokens.shape[0] * self.images_per_prompt
        if n != n_img:
            raise RuntimeError(f"cross-token NMS was set up for {n_img} images but the UNet call has {n} "
                               f"conditional rows (layer {layer})")
        attn = self._modules[layer]
        with torch.no_grad():
            p = probs[cond].float()  # (n, H, Q, K)
            ctx_states = ehs[cond]
            if attn.norm_cross:
                ctx_states = attn.norm_encoder_hidden_states(ctx_states)
            v = attn.to_v(ctx_states).float()  # (n, K, inner)
            H, Q, K = p.shape[1], p.shape[2], p.shape[3]
            v = v.view(n, K, H, -1)
            maps = torch.einsum("nhqk,nkh->nqk", p ** 2, (v ** 2).sum(-1)).sqrt()  # (n, Q, K)
            h, w = spatial_shape(Q, ctx.latent_hw)
            sel = self.selected_tokens.to(p.device).repeat_interleave(self.images_per_prompt, 0)
            if sel.shape[1] != K:
                raise RuntimeError(f"layer {layer} attends over {K} keys; the prompt has {sel.shape[1]} positions")
            mask = nms_suppressed_mask(maps.transpose(1, 2).reshape(n, K, h, w), sel, self.sigma)
            x = torch.einsum("nhqk,nkhd->nqhd", p * mask[:, None].to(p.dtype), v).reshape(n, Q, -1)
            delta = F.linear(x, attn.to_out[0].weight.float()) / attn.rescale_output_factor
            new = out.clone()
            new[cond] = out[cond] - (self.alpha * delta).to(out.dtype)
        return new


@dataclass(frozen=True)
class CrossTokenNMS(Tweak):
    """Cross-Token Non-Maximum Suppression (T2I-Zero) in every cross-attention layer.

    Args:
        words: the words whose tokens compete (a string or list); None = every prompt token between
            BOS and EOS.
        alpha: blend weight in [0, 1] (0 changes nothing).
        sigma: the 3x3 Gaussian's sigma in latent pixels of each layer (>= 0; 0 = no smoothing).
        until_step: apply only in the first ``until_step`` UNet calls of the generation (one per
            denoising step in diffusers' SD/SDXL pipelines); None = every step.
    """

    words: tuple[str, ...] | None = None
    alpha: float = 0.1
    sigma: float = 1.0
    until_step: int | None = None

    def __init__(self, words: str | Sequence[str] | None = None, alpha: float = 0.1, sigma: float = 1.0,
                 until_step: int | None = None):
        if words is not None:
            words = (words,) if isinstance(words, str) else tuple(words)
            if not words:
                raise ValueError("CrossTokenNMS: words must be None (every token) or at least one word")
            for w in words:
                _word("words", w, "CrossTokenNMS")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "alpha", _unit("alpha", alpha, "CrossTokenNMS"))
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 <= sigma < math.inf):
            raise ValueError(f"CrossTokenNMS: sigma must be a finite number >= 0, got {sigma!r}")
        object.__setattr__(self, "sigma", float(sigma))
        if until_step is not None and (isinstance(until_step, bool) or not isinstance(until_step, int)
                                       or until_step < 0):
            raise ValueError(f"CrossTokenNMS: until_step must be None or an int >= 0, got {until_step!r}")
        object.__setattr__(self, "until_step", until_step)

    def selected_tokens(self, xp, prompts: Sequence[str]) -> torch.Tensor:
        """(prompts, L) bool: the competing token positions of every prompt."""
        rows = []
        for prompt in prompts:
            pc = _PromptContext(xp, prompt)
            row = torch.zeros(pc.L, dtype=torch.bool)
            if self.words is None:
                row[1:pc.last + 1] = True
            else:
                for w in self.words:
                    row[[p for p in pc.positions(w) if p <= pc.last]] = True
            rows.append(row)
        return torch.stack(rows)

    def hook(self, xp, prompts: Sequence[str], images_per_prompt: int = 1) -> _NMSEditor:
        """The AttentionEditor to install (``with xp.hooks(hook): xp.generate(...)``) for these prompts."""
        return _NMSEditor(self.selected_tokens(xp, prompts), images_per_prompt, self.alpha, self.sigma,
                          self.until_step)


# --------------------------------------------------------------------------------------------- applying tweaks


def _check_tweaks(tweaks) -> list[Tweak]:
    if isinstance(tweaks, Tweak):
        tweaks = [tweaks]
    tweaks = list(tweaks or [])
    for t in tweaks:
        if not isinstance(t, Tweak):
            raise ValueError(f"tweaks must be tweak objects (CorrectionBySimilarities, CrossTokenNMS, Reweight, "
                             f"Remove, Swap, Interpolate), got {type(t).__name__}: {t!r}")
    n_nms = sum(isinstance(t, CrossTokenNMS) for t in tweaks)
    if n_nms > 1:
        raise ValueError(f"give at most one CrossTokenNMS per call, got {n_nms}")
    return tweaks


def tweak_embeddings(xp, prompt: str | Sequence[str], tweaks) -> PromptEmbeddings:
    """The conditional embeddings of ``prompt`` with the embedding tweaks applied in order.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        prompt: one prompt or a list; every tweak's words must be in every prompt.
        tweaks: tweak objects; attention tweaks (CrossTokenNMS) are ignored here.
    Returns:
        :class:`PromptEmbeddings` (prompts, L, D) (pooled: the prompts' own, SDXL only); new tensors,
        the wrapper's encode cache is left untouched.
    Raises:
        ValueError: a word not in a prompt, or two tweaks writing the same token position.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("give at least one prompt")
    tweaks = [t for t in _check_tweaks(tweaks) if isinstance(t, EmbeddingTweak)]
    base = xp.encode_prompt(prompts)
    rows = []
    for i, p in enumerate(prompts):
        pc = _PromptContext(xp, p)
        owner: dict[int, EmbeddingTweak] = {}
        for t in tweaks:
            for pos in t.targets(pc):
                if pos in owner:
                    raise ValueError(f"conflicting tweaks on prompt {p!r}: {owner[pos]!r} and {t!r} both edit token "
                                     f"position {pos} ({_word_at(pc, pos)!r}); give at most one tweak per word")
                owner[pos] = t
        e = base.embeds[i].detach().cpu()  # the arithmetic runs on the CPU in float64 (any accelerator)
        with torch.no_grad():
            for t in tweaks:
                e = t.apply(e, pc)
        rows.append(e)
    pooled = None if base.pooled is None else base.pooled.clone()
    return PromptEmbeddings(torch.stack(rows).to(base.embeds.device), pooled, prompts)


def _word_at(pc: _PromptContext, pos: int) -> str:
    for w in pc.words:
        if pos in w.positions:
            return w.word
    return f"<position {pos}>"


def generate_with_tweaks(xp, prompt: str | Sequence[str], tweaks=(), seed: int = 0,
                         num_images_per_prompt: int = 1, negative_prompt: str | Sequence[str] | None = None,
                         **kwargs):
    """Generate with tweaks: ``xp.generate`` on tweaked conditional embeddings, under attention tweaks.

    Encodes ``prompt`` (``xp.encode_prompt``), applies the embedding tweaks in order to the
    conditional embeddings only (:func:`tweak_embeddings`), passes them as ``prompt_embeds`` (SDXL:
    plus the prompts' own ``pooled_prompt_embeds``), lets the pipeline build the unconditional branch
    from ``negative_prompt`` as it always does, and installs the attention tweaks for the call.
    With no tweak (or only neutral ones) the images are bit-identical to ``xp.generate(prompt, ...)``.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        prompt: one prompt or a list (images are prompt-major, as ``xp.generate``).
        tweaks: a list of tweak objects (or one), applied in order; see the module docstring.
        seed, num_images_per_prompt, negative_prompt, **kwargs: as :meth:`XAIPipeline.generate`
            (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``output_type``,
            ``progress``, pipeline extras such as ``latents``).
    Returns:
        the pipeline's output (``.images``).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("give at least one prompt")
    for p in prompts:
        validate_prompt(p)
    bad = [k for k in _RESERVED if k in kwargs]
    if bad:
        raise ValueError(f"generate_with_tweaks builds {', '.join(bad)} itself; pass the prompt text instead")
    tweaks = _check_tweaks(tweaks)
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    cond = tweak_embeddings(xp, prompts, tweaks)
    call = dict(kwargs, prompt_embeds=cond.embeds.to(xp.device))
    if xp.is_sdxl:
        call["pooled_prompt_embeds"] = cond.pooled.to(xp.device)
    hooks = [t.hook(xp, prompts, num_images_per_prompt) for t in tweaks if isinstance(t, CrossTokenNMS)]
    with xp.hooks(*hooks) if hooks else contextlib.nullcontext():
        return xp.generate([], seed=seed, num_images_per_prompt=num_images_per_prompt,
                           negative_prompt=negative_prompt, **call)
