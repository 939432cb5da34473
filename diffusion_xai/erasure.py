"""Concept erasure as reversible LoRA adapters on the UNet's cross-attention (METHODS.md section 5).

Four methods, one handle:

* ``closed_form`` -- the UCE edit (Gandikota et al., WACV 2024). For every cross-attention ``to_k`` /
  ``to_v`` matrix W (d_out x D, D = the text-embedding width), with erase vectors c_i (targets
  v_i = W g_i, g_i the guide's embedding), preserve vectors c_j, lam > 0, erase scale s_e and preserve
  scale s_p::

      W_new = (lam W + s_e sum_i v_i c_i^T + s_p sum_j W c_j c_j^T) M^-1,
      M     = lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T.

  Subtracting W M M^-1 gives the change exactly: Delta W = s_e W (G - C)^T C M^-1 with the c_i, g_i as the
  rows of C, G. It has rank <= n (the number of erase vectors), so it is stored *exactly* as a LoRA:
  ``lora_B = W (G - C)^T`` (d_out x n), ``lora_A = s_e C M^-1`` (n x D), rank n and alpha n (scale 1).
  When n > D the factors ``lora_B = Delta W``, ``lora_A = I_D`` (rank D) hold the same change.
* ``neighbors`` -- RealEra-style neighbour mining (2024): every erase vector e gets ``num_neighbors``
  perturbed copies e' = e + eta with ``||eta|| <= d1 ||e||`` and ``cos(e, e') in [s1, s2]`` (d1 is
  relative to ||e||, the norms of text-encoder outputs vary a lot over positions), all sent to e's guide
  vector, so phrasings near the concept are erased too. ``preserve_neighbors`` adds the same kind of
  neighbours of every preserve vector to the preserve set. Then the closed form above.
* ``finetune`` -- ESD-x (Gandikota et al., ICCV 2023): a LoRA on the cross-attention projections trained so
  that eps_theta(x_t, c) matches eps(x_t, g) - eta (eps(x_t, c) - eps(x_t, g)) of the frozen model (the
  adapter disabled), g the guide ("" as in ESD, or an anchor concept in the same template). x_t are the frozen model's own samples of the concept prompts, noised to uniform
  random timesteps. Resumable: ``resume_from`` a saved finetune edit continues to ``steps`` in total, with
  the optimiser state, and gives the same weights as an uninterrupted run.
* ``debias`` -- the UCE debias variant: the concept's vectors are sent to g = c + sum_a alpha_a c_a (c_a:
  the concept with attribute a, ``attribute_template``), and alpha is iterated, alpha_a += s_a
  (target_a - share_a), where the shares are measured by any ``judge`` on generated images, until every
  gap is below ``tol`` (or ``rounds`` rounds). Each attribute's step s_a starts at ``step_size`` and is
  multiplied by ``step_decay`` whenever its gap changes sign from one round to the next (Kesten's rule for
  stochastic root finding): a fixed step that overshoots makes the shares jump between two states for
  ever, as it did on the grounded ShapesWorld model (circle red share 0.06 <-> 0.29 for 15 rounds).

Which token positions give the vectors (METHODS.md leaves it open) is ``token_positions``: ``"last"``
takes the concept's last token only; ``"word_to_eos"`` takes that token and every later position through
the padding (77 - position vectors per text). Each concept is embedded inside every string of
``templates`` (``"{}"`` is the bare concept; ``"a red {}"`` puts it in context, which matters because CLIP's
causal text encoder makes a token's embedding depend on the words before it). The guide vector of a
concept position at offset k after the concept's last token is the guide's embedding at the same offset
after the guide's last token, the guide being embedded in the same template; the empty guide ``""``
is the empty prompt, whose anchor is its BOS token, so the concept's keys and values become the empty
prompt's ones.

Edits never change the base weights: each is a named peft adapter on the UNet (``edit.name``), switched
with :meth:`Edit.enable` / :meth:`Edit.disable` / :meth:`Edit.set_scale`, removed with
:meth:`Edit.remove` (the last removal unwraps the LoRA layers, restoring the original modules), written by
:meth:`Edit.save` in the diffusers LoRA format (``pipe.load_lora_weights(folder)`` loads it into a plain
pipeline) and merged into the base weights only by an explicit :meth:`Edit.fuse`. Several edits can be
active at once; each is computed against the base weights, and their changes add up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokens import find_word

METHODS = ("closed_form", "neighbors", "finetune", "debias")
TOKEN_POSITIONS = ("last", "word_to_eos")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
META_NAME = "edit.json"
TRAIN_STATE_NAME = "training_state.pt"
FINETUNE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

# per UNet: adapter name -> {"enabled": bool, "scale": float} of the edits this module manages
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------- the maths


def closed_form_factors(W: torch.Tensor, C: torch.Tensor, G: torch.Tensor, P: torch.Tensor, lam: float = 0.5,
                        erase_scale: float = 1.0, preserve_scale: float = 1.0,
                        solved: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B, A) of the UCE edit of one matrix: W_new = W + B @ A.

    Args:
        W: (d_out, D) the base weight.
        C: (n, D) erase vectors c_i (rows).
        G: (n, D) guide vectors g_i (targets v_i = W g_i).
        P: (m, D) preserve vectors c_j (m may be 0).
        lam: the weight of staying close to W (> 0).
        erase_scale / preserve_scale: weights of the erase / preserve terms.
        solved: ``erase_scale * C M^-1`` when already known (it does not depend on W).
    Returns:
        B (d_out, n) and A (n, D) in float64, or B = Delta W (d_out, D), A = I_D when n > D.
    """
    W = W.double()
    A = solved if solved is not None else solve_erase_rows(C, P, lam, erase_scale, preserve_scale)
    B = W @ (G.double() - C.double()).T
    if C.shape[0] > C.shape[1]:
        return B @ A, torch.eye(C.shape[1], dtype=torch.float64)
    return B, A


def solve_erase_rows(C: torch.Tensor, P: torch.Tensor, lam: float, erase_scale: float,
                     preserve_scale: float) -> torch.Tensor:
    """``erase_scale * C M^-1`` (n, D) float64, M = lam I + s_e C^T C + s_p P^T P (the rows of C, P as vectors)."""
    C, P = C.double(), P.double()
    D = C.shape[1]
    M = lam * torch.eye(D, dtype=torch.float64) + erase_scale * C.T @ C
    if P.shape[0]:
        M = M + preserve_scale * P.T @ P
    return erase_scale * torch.linalg.solve(M, C.T).T  # M is symmetric: C M^-1 = (M^-1 C^T)^T


def sample_neighbors(e: torch.Tensor, num: int, d1: float, s1: float, s2: float,
                     generator: torch.Generator) -> torch.Tensor:
    """``num`` vectors e' near each row e: ``||e' - e|| <= d1 ||e||`` and ``cos(e, e') in [s1, s2]``.

    Exact sampling, no rejection: a cosine s uniform in the feasible part of [s1, s2], a direction u
    uniform among unit vectors orthogonal to e, and a norm ratio rho = ||e'|| / ||e|| uniform among the
    ratios that keep ``||e' - e||`` within ``d1 ||e||``; then e' = rho ||e|| (s e/||e|| + sqrt(1 - s^2) u).

    Args:
        e: (n, D) vectors.
        num: neighbours per vector.
        d1: largest distance, as a fraction of ||e|| (> 0).
        s1, s2: the cosine band, -1 <= s1 <= s2 <= 1; cosines below sqrt(1 - d1^2) cannot be reached
            within distance d1 and are left out.
        generator: the seeded torch generator (CPU).
    Returns:
        (n * num, D) float64, the neighbours of row 0 first.
    """
    lo = max(s1, math.sqrt(max(0.0, 1.0 - d1 * d1)) if d1 < 1 else s1)
    if lo > s2:
        raise ValueError(f"no neighbour satisfies ||eta|| <= d1 ||e|| with d1={d1} and cos in [s1, s2] = [{s1}, {s2}]: "
                         f"within distance {d1} the cosine is at least {math.sqrt(1 - d1 * d1):.4f}; "
                         f"raise s2 or d1")
    e = e.double()
    n, D = e.shape
    norm = e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = e / norm
    unit = unit.repeat_interleave(num, 0)
    norm = norm.repeat_interleave(num, 0)
    u = torch.randn(n * num, D, generator=generator, dtype=torch.float64)
    u = u - (u * unit).sum(1, keepdim=True) * unit
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = lo + (s2 - lo) * torch.rand(n * num, 1, generator=generator, dtype=torch.float64)
    # ||rho e^ - s... ||^2 = rho^2 - 2 rho s + 1 <= d1^2  <=>  rho in [s - r, s + r], r = sqrt(s^2 - 1 + d1^2)
    half = (s * s - 1 + d1 * d1).clamp_min(0).sqrt()
    rho_lo = (s - half).clamp_min(0)
    rho = rho_lo + (s + half - rho_lo) * torch.rand(n * num, 1, generator=generator, dtype=torch.float64)
    return rho * norm * (s * unit + (1 - s * s).clamp_min(0).sqrt() * u)


def harmonic_h(acc_e: float, acc_s: float, acc_g: float | None = None) -> float:
    """H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)) (MACE); without Acc_g the 2-term harmonic mean."""
    terms = [1 - acc_e, acc_s] + ([] if acc_g is None or (isinstance(acc_g, float) and math.isnan(acc_g))
                                  else [1 - acc_g])
    if min(terms) <= 0:
        return 0.0
    return len(terms) / sum(1.0 / t for t in terms)


# --------------------------------------------------------------------------------------------- embeddings


@dataclass
class EditVectors:
    """The vectors of a closed-form edit, in the cross-attention input space (rows, float64, CPU).

    Attributes:
        erase: (n, D) c_i, one row per (concept, template, position) plus mined neighbours.
        guide: (n, D) g_i, the targets are v_i = W g_i.
        preserve: (m, D) c_j.
        labels: one ``"text@position"`` per erase row (neighbours: ``"...~k"``).
    """

    erase: torch.Tensor
    guide: torch.Tensor
    preserve: torch.Tensor
    labels: list[str]


def _validate_concepts(xp, concepts, what: str) -> list[str]:
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts)
    tok = xp.tokenizers[0]
    for c in concepts:
        if not isinstance(c, str):
            raise ValueError(f"{what} concepts must be strings, got {type(c).__name__}: {c!r}")
        if not tok(c, add_special_tokens=False).input_ids:
            raise ValueError(f"{what} concept {c!r} tokenises to nothing; give a word or phrase with visible "
                             f"characters")
    return concepts


def _validate_templates(templates) -> list[str]:
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates must hold at least one string with one '{}', e.g. '{}' or 'a photo of {}'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1 or re.search(r"\{[^}]", t):
            raise ValueError(f"template {t!r} must be a string with exactly one '{{}}' where the concept goes")
    return templates


def _anchor(xp, text: str, word: str) -> int:
    """Position of the last token of the last occurrence of ``word`` in ``text`` (0 = BOS for the empty text)."""
    if not word:
        return 0
    return max(find_word(xp.tokenizers[0], text, word))


def _embeds(xp, text: str) -> torch.Tensor:
    return xp.encode_prompt(text).embeds[0].detach().double().cpu()


def _concept_rows(xp, concept: str, template: str, token_positions: str) -> tuple[torch.Tensor, list[int], str]:
    """(k, D) vectors of a concept in a template, their offsets after the concept's last token, and the text."""
    text = template.format(concept)
    anchor = _anchor(xp, text, concept)
    L = xp.tokenizers[0].model_max_length
    offsets = [0] if token_positions == "last" else list(range(L - anchor))
    e = _embeds(xp, text)
    return e[[anchor + k for k in offsets]], offsets, text


def _aligned_rows(xp, word: str, template: str, offsets: list[int]) -> torch.Tensor:
    """Rows of ``word`` in ``template`` at the given offsets after its last token ("" -> the empty prompt)."""
    text = template.format(word) if word else ""
    anchor = _anchor(xp, text, word)
    L = xp.tokenizers[0].model_max_length
    e = _embeds(xp, text)
    return e[[min(anchor + k, L - 1) for k in offsets]]


def edit_vectors(xp, concepts: Sequence[str], preserve: Sequence[str] = (), guide: str = "",
                 templates: Sequence[str] = ("{}",), token_positions: str = "last") -> EditVectors:
    """Erase, guide and preserve vectors of concepts (see the module docstring for the positions)."""
    if token_positions not in TOKEN_POSITIONS:
        raise ValueError(f"token_positions must be one of {TOKEN_POSITIONS}, got {token_positions!r}")
    texts = [t.format(c) for c in [*concepts, *preserve] for t in templates]
    texts += [t.format(guide) for t in templates] if guide else [""]
    xp.encode_prompt(list(dict.fromkeys(texts)))  # one batched text-encoder call fills the wrapper's cache
    C, G, P, labels = [], [], [], []
    for concept in concepts:
        for template in templates:
            rows, offsets, text = _concept_rows(xp, concept, template, token_positions)
            anchor = _anchor(xp, text, concept)
            C.append(rows)
            G.append(_aligned_rows(xp, guide, template, offsets))
            labels += [f"{text}@{anchor + k}" for k in offsets]
    for concept in preserve:
        for template in templates:
            P.append(_concept_rows(xp, concept, template, token_positions)[0])
    D = C[0].shape[1]
    return EditVectors(torch.cat(C), torch.cat(G), torch.cat(P) if P else torch.zeros(0, D, dtype=torch.float64),
                       labels)


# --------------------------------------------------------------------------------------------- adapters on the UNet


def cross_attention_modules(unet, projections: Sequence[str] = ("to_k", "to_v")) -> list[str]:
    """Names of the given projections of every cross-attention (``attn2``) of the UNet, in module order."""
    names = []
    for name, mod in unet.named_modules():
        if name.endswith("attn2") and getattr(mod, "is_cross_attention", True) and hasattr(mod, "to_k"):
            names += [f"{name}.{p}" for p in projections]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no cross-attention (attn2) layers to edit")
    return names


def _base_linear(unet, name: str) -> torch.nn.Linear:
    m = unet.get_submodule(name)
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]


def _fingerprint(unet, modules: Sequence[str]) -> str:
    """sha256 of the base weights of ``modules`` (float32 bytes)."""
    h = hashlib.sha256()
    for n in modules:
        h.update(n.encode())
        h.update(_base_linear(unet, n).weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _apply(unet) -> None:
    """Make the active adapters of every LoRA layer = foreign active ones + our enabled edits, with our scales.

    peft's ``set_adapter`` also changes ``requires_grad``; the flags are put back as they were.
    """
    state = _REGISTRY.get(unet, {})
    for _, layer in _lora_layers(unet):
        foreign = [a for a in layer.active_adapters if a not in state]
        ours = [a for a, s in state.items() if s["enabled"] and a in layer.lora_A]
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(foreign + ours, inference_mode=True)
        for p, f in flags:
            p.requires_grad_(f)
        for a, s in state.items():
            if a in layer.scaling:
                layer.set_scale(a, s["scale"])


def _unique_name(unet, base: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_")[:60] or "edit"
    taken = set(getattr(unet, "peft_config", {}) or {})
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _add_adapter(unet, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """Add LoRA adapter ``name`` holding B @ A on each module (factors: module -> (A, B)); state kept as it was."""
    from peft import LoraConfig

    if name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"the UNet already holds an adapter named {name!r}; "
                         f"taken: {', '.join(unet.peft_config)}")
    before = {n: list(m.active_adapters) for n, m in _lora_layers(unet)}
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(factors), lora_dropout=0.0)
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():  # peft's init must not move the RNG
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=name)  # (it also makes `name` the only active adapter)
    for n, m in _lora_layers(unet):
        m.set_adapter(before.get(n, []), inference_mode=True)
    for p, f in flags:  # every parameter that existed keeps its flag; the new adapter's are frozen
        p.requires_grad_(f)
    _set_factors(unet, name, factors)
    _REGISTRY.setdefault(unet, {})[name] = {"enabled": True, "scale": 1.0}
    _apply(unet)


def _adapter_params(layer, name: str) -> list[torch.nn.Parameter]:
    out = []
    for attr in ("lora_A", "lora_B"):
        d = getattr(layer, attr)
        if name in d:
            out += list(d[name].parameters())
    return out


@torch.no_grad()
def _set_factors(unet, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for n, (A, B) in factors.items():
        m = unet.get_submodule(n)
        wa, wb = m.lora_A[name].weight, m.lora_B[name].weight
        if tuple(wa.shape) != tuple(A.shape) or tuple(wb.shape) != tuple(B.shape):
            raise ValueError(f"module {n}: adapter {name!r} has lora_A {tuple(wa.shape)}, lora_B {tuple(wb.shape)}; "
                             f"got factors {tuple(A.shape)}, {tuple(B.shape)}")
        wa.copy_(A.to(wa.device, wa.dtype))
        wb.copy_(B.to(wb.device, wb.dtype))


def _get_factors(unet, name: str, modules: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (unet.get_submodule(n).lora_A[name].weight.detach(), unet.get_submodule(n).lora_B[name].weight.detach())
            for n in modules}


# --------------------------------------------------------------------------------------------- the handle


class Edit:
    """A concept edit living as the named peft LoRA adapter ``name`` on ``xp.unet``.

    Attributes:
        name: the adapter name.
        method: one of :data:`METHODS`.
        concepts / preserve / guide: what was erased, kept, and what the concepts were sent to.
        params: every other setting (lam, scales, templates, token_positions, method options).
        modules: the module names holding the adapter (the cross-attention ``to_k`` / ``to_v``).
        rank: the LoRA rank.
        edit_time_s: seconds spent computing the edit (text encoding + solve, or training; not generation
            for debias); ``timings`` splits closed-form edits into vectors_s, solve_s, adapter_s.
        vectors: the :class:`EditVectors` of closed-form edits (None for finetune and loaded edits).
        history: per-round records of debias (alpha, shares) and per-step losses of finetune.
    """

    def __init__(self, xp, name: str, method: str, concepts: list[str], preserve: list[str], guide: str,
                 params: dict, modules: list[str], rank: int, edit_time_s: float = 0.0,
                 vectors: EditVectors | None = None, history: list | None = None, base_sha: str = ""):
        self.xp = xp
        self.name = name
        self.method = method
        self.concepts = concepts
        self.preserve = preserve
        self.guide = guide
        self.params = params
        self.modules = modules
        self.rank = rank
        self.edit_time_s = edit_time_s
        self.vectors = vectors
        self.history = history or []
        self.base_sha = base_sha
        self.removed = False
        self.fused = False
        self.timings: dict[str, float] = {}

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("enabled" if self.enabled else "disabled")
        return (f"Edit({self.name!r}, method={self.method!r}, concepts={self.concepts}, rank={self.rank}, "
                f"{state}, scale={self.scale})")

    # ---------------------------------------------------------------- state
    @property
    def _state(self) -> dict:
        if self.removed:
            raise RuntimeError(f"edit {self.name!r} was {'fused' if self.fused else 'removed'}; it has no adapter")
        return _REGISTRY[self.xp.unet][self.name]

    @property
    def enabled(self) -> bool:
        return False if self.removed else self._state["enabled"]

    @property
    def scale(self) -> float:
        return 0.0 if self.removed else self._state["scale"]

    def enable(self, scale: float | None = None) -> Edit:
        """Switch the edit on (optionally at a new scale)."""
        self._state["enabled"] = True
        if scale is not None:
            return self.set_scale(scale)
        _apply(self.xp.unet)
        return self

    def disable(self) -> Edit:
        """Switch the edit off: the UNet computes exactly what it did without it."""
        self._state["enabled"] = False
        _apply(self.xp.unet)
        return self

    def set_scale(self, scale: float) -> Edit:
        """Multiply the change by ``scale`` (1 = the computed edit, 0 = no change, 2 = twice the change)."""
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self._state["scale"] = float(scale)
        _apply(self.xp.unet)
        return self

    @contextlib.contextmanager
    def disabled(self):
        """Context manager: the edit off inside the block, back to its previous state after (also on errors)."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def remove(self) -> None:
        """Delete the adapter; when no adapter is left, the LoRA wrappers are removed (the original modules back)."""
        if self.removed:
            return
        unet = self.xp.unet
        self.disable()
        unet.delete_adapters(self.name)
        _REGISTRY[unet].pop(self.name)
        if not getattr(unet, "peft_config", None):
            unet.unload_lora()
        self.removed = True

    @torch.no_grad()
    def fuse(self) -> None:
        """Add ``scale * B @ A`` into the base weights for good and delete the adapter.

        The only operation that changes base weights; call it only when the edit should become permanent.
        """
        unet = self.xp.unet
        scale = self.scale
        for n, (A, B) in _get_factors(unet, self.name, self.modules).items():
            w = _base_linear(unet, n).weight
            w.add_((scale * (B.double() @ A.double())).to(w.dtype))
        self.remove()
        self.fused = True

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (lora_A (rank, in), lora_B (out, rank)); the change is scale * B @ A."""
        return _get_factors(self.xp.unet, self.name, self.modules)

    def delta(self, module: str) -> torch.Tensor:
        """The weight change (out, in) float64 this edit adds to ``module`` at its current scale."""
        A, B = self.factors()[module]
        return self.scale * (B.double() @ A.double())

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        """JSON-safe description (no tensors)."""
        return {"name": self.name, "method": self.method, "concepts": self.concepts, "preserve": self.preserve,
                "guide": self.guide, "params": self.params, "rank": self.rank, "num_modules": len(self.modules),
                "edit_time_s": self.edit_time_s, "enabled": self.enabled, "scale": self.scale,
                "history": self.history}

    def save(self, folder: str | Path) -> Path:
        """Write the adapter in the diffusers LoRA format plus ``edit.json``.

        ``pipe.load_lora_weights(folder)`` loads it into a plain diffusers pipeline of the same architecture
        (adapter weights at scale 1); :meth:`Edit.load` restores the handle. Finetune edits also write their
        optimiser state (``training_state.pt``) so training can resume.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {}
        for n, (A, B) in self.factors().items():
            sd[f"{n}.lora_A.weight"] = A.float().cpu().contiguous()
            sd[f"{n}.lora_B.weight"] = B.float().cpu().contiguous()
        metadata = {"r": self.rank, "lora_alpha": self.rank, "target_modules": sorted(self.modules),
                    "lora_dropout": 0.0}
        type(self.xp.pipe).save_lora_weights(folder, unet_lora_layers=sd, unet_lora_adapter_metadata=metadata,
                                             weight_name=LORA_WEIGHT_NAME)
        shapes = {n: list(_base_linear(self.xp.unet, n).weight.shape) for n in self.modules}
        meta = {**self.to_dict(), "modules": self.modules, "shapes": shapes, "base_sha": self.base_sha,
                "format": "diffusion_xai.erasure/1"}
        (folder / META_NAME).write_text(json.dumps(meta, indent=2))
        if getattr(self, "_train_state", None) is not None:
            torch.save(self._train_state, folder / TRAIN_STATE_NAME)
        else:
            (folder / TRAIN_STATE_NAME).unlink(missing_ok=True)  # a stale one from an earlier save there
        return folder

    @classmethod
    def load(cls, xp, folder: str | Path, name: str | None = None, enabled: bool = True) -> Edit:
        """Restore a saved edit onto ``xp``'s UNet as a new adapter.

        Raises:
            FileNotFoundError: no saved edit in ``folder``.
            ValueError: the adapter was made for another architecture (a module missing or of another shape).
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, weights = folder / META_NAME, folder / LORA_WEIGHT_NAME
        if not meta_path.exists() or not weights.exists():
            raise FileNotFoundError(f"no saved edit in {folder} (needs {META_NAME} and {LORA_WEIGHT_NAME})")
        meta = json.loads(meta_path.read_text())
        sd = load_file(str(weights))
        modules = meta["modules"]
        unet = xp.unet
        problems = []
        for n in modules:
            ka, kb = f"unet.{n}.lora_A.weight", f"unet.{n}.lora_B.weight"
            if ka not in sd or kb not in sd:
                problems.append(f"{n}: missing from the weights file")
                continue
            try:
                w = _base_linear(unet, n).weight
            except AttributeError:
                problems.append(f"{n}: no such module in this UNet")
                continue
            want = (sd[kb].shape[0], sd[ka].shape[1])
            if tuple(w.shape) != want:
                problems.append(f"{n}: weight {tuple(w.shape)} here, the adapter expects {want}")
        ours = set(cross_attention_modules(unet, _projections(modules)))
        extra = sorted(ours - set(modules))
        if problems or extra:
            detail = "; ".join(problems[:3] + [f"{e}: not covered by the adapter" for e in extra[:3]])
            raise ValueError(f"the edit in {folder} was made for another architecture ({len(problems)} of its "
                             f"{len(modules)} modules do not fit this UNet, {len(extra)} of this UNet's "
                             f"cross-attention modules are not in it): {detail}")
        sha = _fingerprint(unet, modules)
        if meta.get("base_sha") and meta["base_sha"] != sha:
            warnings.warn(f"the edit in {folder} was computed for other base weights (fingerprint "
                          f"{meta['base_sha'][:12]}, this model {sha[:12]}); it still loads, but a closed-form "
                          f"edit only does what it says on the weights it was solved for", stacklevel=2)
        name = _unique_name(unet, name or meta["name"])
        factors = {n: (sd[f"unet.{n}.lora_A.weight"], sd[f"unet.{n}.lora_B.weight"]) for n in modules}
        _add_adapter(unet, name, factors, int(meta["rank"]))
        edit = cls(xp, name, meta["method"], meta["concepts"], meta["preserve"], meta["guide"], meta["params"],
                   modules, int(meta["rank"]), meta.get("edit_time_s", 0.0), history=meta.get("history"),
                   base_sha=sha)
        edit.set_scale(meta.get("scale", 1.0))
        if not enabled:
            edit.disable()
        if (folder / TRAIN_STATE_NAME).exists():
            edit._train_state = torch.load(folder / TRAIN_STATE_NAME, weights_only=True)
        return edit


def _projections(modules: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(n.split("attn2.", 1)[1] for n in modules))


def active_edits(xp) -> list[str]:
    """Names of the erasure edits on ``xp``'s UNet (enabled or not)."""
    return list(_REGISTRY.get(xp.unet, {}))


# --------------------------------------------------------------------------------------------- erase()


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def erase(xp, concepts: str | Sequence[str], preserve: str | Sequence[str] = (), guide: str = "",
          method: str = "closed_form", lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0,
          token_positions: str = "last", templates: str | Sequence[str] = ("{}",), name: str | None = None,
          num_neighbors: int = 16, d1: float = 0.5, s1: float = 0.85, s2: float = 0.98, preserve_neighbors: int = 0,
          steps: int = 200, lr: float = 1e-3, eta: float = 2.0, rank: int = 4, batch_size: int = 4,
          num_samples: int = 8, resume_from: str | Path | None = None,
          projections: Sequence[str] = ("to_k", "to_v"),
          targets: dict[str, float] | None = None, judge: Callable | None = None,
          prompts: Sequence[str] | None = None, attribute_template: str = "{attribute} {concept}",
          rounds: int = 30, tol: float = 0.05, step_size: float = 1.0, step_decay: float = 0.5,
          num_inference_steps: int | None = None, guidance_scale: float | None = None,
          height: int | None = None, width: int | None = None, seed: int = 0, progress: bool = True) -> Edit:
    """Erase concepts from ``xp``'s UNet; returns the :class:`Edit` (already enabled). Maths: module docstring.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        concepts: the word(s)/phrase(s) to erase.
        preserve: concepts whose cross-attention keys/values must stay as they are.
        guide: what the erased concepts become ("" = the empty prompt).
        method: ``"closed_form"``, ``"neighbors"``, ``"finetune"`` or ``"debias"``.
        lam: weight of staying close to the base weights (> 0; smaller = stronger edit).
        erase_scale / preserve_scale: weights of the erase / preserve terms of the closed form.
        token_positions: ``"last"`` (the concept's last token) or ``"word_to_eos"`` (it through the padding).
        templates: strings with one ``{}`` each, the contexts the concepts are embedded in.
        name: adapter name (default from the method and concepts; made unique).
        num_neighbors, d1, s1, s2, preserve_neighbors: neighbour mining (``neighbors``): neighbours per erase
            vector, distance bound relative to ||e||, cosine band, neighbours per preserve vector.
        steps, lr, eta, rank, batch_size, num_samples, resume_from, projections: ESD fine-tuning
            (``finetune``): total optimiser steps, Adam learning rate (LoRA factors need a larger one than
            ESD's full fine-tuning, 5e-5), negative-guidance strength, LoRA rank, rows per step, frozen-model
            samples of the concept prompts, a saved finetune edit to continue, which ``attn2`` projections
            get the LoRA (ESD-x: cross-attention only).
        targets, judge, prompts, attribute_template, rounds, tol, step_size, step_decay: debias (``debias``):
            target share
            of each attribute value (summing to 1); ``judge(images: list[PIL.Image]) -> list[str | None]``,
            the attribute value seen in each image (None or unknown values are not counted); the prompts
            that are generated to measure (default: ``templates`` filled with the concept); text of the
            concept with an attribute; most rounds; stop when every |target - share| < tol; first alpha
            update step; factor in (0, 1] on an attribute's step when its gap changes sign (1: fixed steps).
            ``num_samples`` images per prompt are generated each round.
        num_inference_steps, guidance_scale, height, width: sampling of ``finetune`` and ``debias`` (default:
            the wrapper's steps and guidance, the pipeline's size).
        seed: seeds everything random (neighbours, LoRA init, training draws, generations).
        progress: tqdm bars for training and debias rounds.
    Raises:
        ValueError: unknown method or positions, a concept that tokenises to nothing, a preserve concept that
            is also erased, lam <= 0, bad method options.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if token_positions not in TOKEN_POSITIONS:
        raise ValueError(f"token_positions must be one of {TOKEN_POSITIONS}, got {token_positions!r}")
    concepts = _validate_concepts(xp, concepts, "erase")
    if not concepts:
        raise ValueError("give at least one concept to erase")
    preserve = _validate_concepts(xp, preserve, "preserve")
    overlap = sorted({c.strip().lower() for c in concepts} & {p.strip().lower() for p in preserve})
    if overlap:
        raise ValueError(f"concepts {overlap} are both erased and preserved; the preserve set must not contain "
                         f"the erased concepts {concepts}")
    if not isinstance(guide, str):
        raise ValueError(f"guide must be a string ('' = the empty prompt), got {guide!r}")
    if guide:
        _validate_concepts(xp, guide, "guide")
    lam = _check_positive("lam", lam)
    erase_scale = _check_positive("erase_scale", erase_scale)
    preserve_scale = _check_positive("preserve_scale", preserve_scale, allow_zero=True)
    templates = _validate_templates(templates)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    params = {"lam": lam, "erase_scale": erase_scale, "preserve_scale": preserve_scale,
              "token_positions": token_positions, "templates": templates, "seed": int(seed)}
    unet = xp.unet
    name = _unique_name(unet, name or f"{method}_{'_'.join(concepts)}")

    if method == "finetune":
        return _finetune(xp, name, concepts, preserve, guide, templates, params, steps=steps, lr=lr, eta=eta,
                         rank=rank, batch_size=batch_size, num_samples=num_samples, resume_from=resume_from,
                         projections=projections, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, size=(height, width), seed=seed, progress=progress)

    t0 = time.perf_counter()
    vec = edit_vectors(xp, concepts, preserve, guide, templates, token_positions)
    if method == "neighbors":
        for k, v in (("num_neighbors", num_neighbors), ("preserve_neighbors", preserve_neighbors)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an integer >= 0, got {v!r}")
        d1 = _check_positive("d1", d1)
        if not (-1 <= s1 <= s2 <= 1):
            raise ValueError(f"the cosine band needs -1 <= s1 <= s2 <= 1, got s1={s1}, s2={s2}")
        gen = torch.Generator().manual_seed(int(seed))
        if num_neighbors:
            nb = sample_neighbors(vec.erase, num_neighbors, d1, s1, s2, gen)
            vec.erase = torch.cat([vec.erase, nb])
            vec.guide = torch.cat([vec.guide, vec.guide.repeat_interleave(num_neighbors, 0)])
            vec.labels += [f"{lab}~{k}" for lab in vec.labels for k in range(num_neighbors)]
        if preserve_neighbors and vec.preserve.shape[0]:
            vec.preserve = torch.cat([vec.preserve, sample_neighbors(vec.preserve, preserve_neighbors, d1, s1, s2,
                                                                     gen)])
        params.update(num_neighbors=num_neighbors, d1=d1, s1=s1, s2=s2, preserve_neighbors=preserve_neighbors)

    modules = cross_attention_modules(unet)
    if method == "debias":
        return _debias(xp, name, concepts, preserve, guide, templates, params, vec, modules, targets=targets,
                       judge=judge, prompts=prompts, attribute_template=attribute_template, rounds=rounds, tol=tol,
                       step_size=step_size, step_decay=step_decay, num_samples=num_samples,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, size=(height, width),
                       seed=seed, progress=progress, t0=t0)

    t1 = time.perf_counter()
    factors, rank_ = _closed_form_all(unet, modules, vec, lam, erase_scale, preserve_scale)
    t2 = time.perf_counter()
    _add_adapter(unet, name, factors, rank_)
    edit = Edit(xp, name, method, concepts, preserve, guide, params, modules, rank_, t2 - t0, vec,
                base_sha=_fingerprint(unet, modules))
    edit.timings = {"vectors_s": t1 - t0, "solve_s": t2 - t1, "adapter_s": time.perf_counter() - t2}
    return edit


def _closed_form_all(unet, modules, vec: EditVectors, lam, erase_scale, preserve_scale):
    """LoRA factors {module: (A, B)} of the closed-form edit on every module, and the rank."""
    solved = solve_erase_rows(vec.erase, vec.preserve, lam, erase_scale, preserve_scale)
    factors = {}
    for n in modules:
        W = _base_linear(unet, n).weight.detach().double().cpu()
        if W.shape[1] != vec.erase.shape[1]:
            raise ValueError(f"module {n} takes {W.shape[1]}-dim inputs but the text embeddings are "
                             f"{vec.erase.shape[1]}-dim")
        B, A = closed_form_factors(W, vec.erase, vec.guide, vec.preserve, solved=solved)
        factors[n] = (A, B)
    return factors, next(iter(factors.values()))[0].shape[0]


# --------------------------------------------------------------------------------------------- debias


def debias_update(alpha: dict, steps: dict, gaps: dict, prev_gaps: dict | None, decay: float) -> tuple[dict, dict]:
    """One debias round: an attribute's step is multiplied by ``decay`` when its gap (target - share) has
    changed sign since the previous round, then ``alpha_a += step_a * gap_a``. Returns new (alpha, steps)."""
    steps = {a: s * decay if prev_gaps is not None and gaps[a] * prev_gaps[a] < 0 else s for a, s in steps.items()}
    return {a: alpha[a] + steps[a] * gaps[a] for a in alpha}, steps


def _debias(xp, name, concepts, preserve, guide, templates, params, vec, modules, *, targets, judge, prompts,
            attribute_template, rounds, tol, step_size, step_decay, num_samples, num_inference_steps,
            guidance_scale, size,
            seed, progress, t0) -> Edit:
    from tqdm.auto import tqdm

    if not isinstance(targets, dict) or not targets:
        raise ValueError("debias needs targets: {attribute value: target share}, e.g. {'male': 0.5, 'female': 0.5}")
    shares_sum = sum(targets.values())
    if any(not (0 <= v <= 1) for v in targets.values()) or abs(shares_sum - 1) > 1e-6:
        raise ValueError(f"targets must be shares in [0, 1] summing to 1, got {targets} (sum {shares_sum:.4g})")
    if not callable(judge):
        raise ValueError(f"debias needs judge: a callable images -> attribute values, got {judge!r}")
    if "{attribute}" not in attribute_template or "{concept}" not in attribute_template:
        raise ValueError(f"attribute_template must contain {{attribute}} and {{concept}}, got {attribute_template!r}")
    if guide:
        raise ValueError(f"debias sends the concept to concept + sum_a alpha_a attribute_a; guide must be '', "
                         f"got {guide!r}")
    _check_positive("tol", tol)
    _check_positive("step_size", step_size)
    if not 0 < step_decay <= 1:
        raise ValueError(f"step_decay must be in (0, 1], got {step_decay!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    attrs = list(targets)
    # attribute vectors aligned with the erase rows: c_a at the same offsets after the concept's last token
    tp = params["token_positions"]
    attr_rows = {a: [] for a in attrs}
    for concept in concepts:
        for template in templates:
            _, offsets, _ = _concept_rows(xp, concept, template, tp)
            for a in attrs:
                text = attribute_template.format(attribute=a, concept=concept)
                # anchored on the last token of the whole attribute text, e.g. "circle" of "red circle"
                attr_rows[a].append(_aligned_rows(xp, text, template, offsets))
    A_rows = {a: torch.cat(r) for a, r in attr_rows.items()}
    prompts = list(prompts) if prompts else [t.format(c) for c in concepts for t in templates]
    lam, es, ps = params["lam"], params["erase_scale"], params["preserve_scale"]
    alpha = {a: 0.0 for a in attrs}
    steps, prev_gaps = {a: float(step_size) for a in attrs}, None
    history, edit, solve_time = [], None, time.perf_counter() - t0
    bar = tqdm(range(rounds + 1), desc=f"debias {name}", disable=not progress)
    for r in bar:
        t1 = time.perf_counter()
        vec.guide = vec.erase + sum(alpha[a] * A_rows[a] for a in attrs)
        factors, rank_ = _closed_form_all(xp.unet, modules, vec, lam, es, ps)
        if edit is None:
            _add_adapter(xp.unet, name, factors, rank_)
            edit = Edit(xp, name, "debias", concepts, preserve, guide, params, modules, rank_, 0.0, vec,
                        base_sha=_fingerprint(xp.unet, modules))
        else:
            _set_factors(xp.unet, name, factors)
        solve_time += time.perf_counter() - t1
        out = xp.generate(prompts, seed=seed, num_images_per_prompt=num_samples, height=size[0], width=size[1],
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=False)
        labels = list(judge(out.images))
        if len(labels) != len(out.images):
            raise ValueError(f"judge returned {len(labels)} values for {len(out.images)} images")
        counted = [v for v in labels if v in targets]
        shares = {a: (counted.count(a) / len(counted) if counted else 0.0) for a in attrs}
        gaps = {a: targets[a] - shares[a] for a in attrs}
        worst = max(abs(g) for g in gaps.values())
        history.append({"round": r, "alpha": dict(alpha), "shares": shares, "counted": len(counted),
                        "max_gap": worst, "steps": dict(steps)})
        bar.set_postfix(max_gap=f"{worst:.3f}")
        if worst < tol or r == rounds:
            break
        alpha, steps = debias_update(alpha, steps, gaps, prev_gaps, step_decay)
        prev_gaps = gaps
    edit.history = history
    edit.edit_time_s = solve_time
    params.update(targets=targets, attribute_template=attribute_template, rounds=rounds, tol=tol,
                  step_size=step_size, step_decay=step_decay, num_samples=num_samples, prompts=prompts, alpha=alpha,
                  converged=history[-1]["max_gap"] < tol)
    return edit


# --------------------------------------------------------------------------------------------- finetune (ESD)


def _finetune(xp, name, concepts, preserve, guide, templates, params, *, steps, lr, eta, rank, batch_size,
              num_samples, resume_from, projections, num_inference_steps, guidance_scale, size, seed,
              progress) -> Edit:
    from tqdm.auto import tqdm

    for k, v in (("steps", steps), ("rank", rank), ("batch_size", batch_size), ("num_samples", num_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    lr = _check_positive("lr", lr)
    if not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    bad = [p for p in projections if p not in FINETUNE_PROJECTIONS]
    if bad or not projections:
        raise ValueError(f"projections must be a non-empty subset of {FINETUNE_PROJECTIONS}, got {list(projections)}")
    if preserve:
        raise ValueError(f"finetune (ESD) has no preserve term; got preserve={preserve}. Use closed_form or "
                         f"neighbors to preserve concepts")
    unet = xp.unet
    modules = cross_attention_modules(unet, projections)
    prompts = [t.format(c) for c in concepts for t in templates]
    start, opt_state, init = 0, None, None
    if resume_from is not None:
        prev = Edit.load(xp, resume_from, name=f"{name}_resume", enabled=False)
        try:
            if prev.method != "finetune":
                raise ValueError(f"resume_from {resume_from} holds a {prev.method!r} edit, not a finetune edit")
            same = {k: prev.params.get(k) for k in ("eta", "lr", "templates", "seed", "batch_size", "num_samples")}
            want = {"eta": float(eta), "lr": lr, "templates": templates, "seed": int(seed), "batch_size": batch_size,
                    "num_samples": num_samples}
            if prev.concepts != concepts or prev.rank != rank or same != want or prev.modules != modules:
                raise ValueError(f"resume_from {resume_from} was trained with concepts={prev.concepts}, "
                                 f"rank={prev.rank}, {same}; this call asks concepts={concepts}, rank={rank}, {want}")
            init = {n: (A.clone(), B.clone()) for n, (A, B) in prev.factors().items()}
            state = getattr(prev, "_train_state", None) or {}
            start, opt_state = int(prev.params.get("steps_done", 0)), state.get("optimizer")
            history = list(prev.history)
        finally:
            prev.remove()
        if start >= steps:
            raise ValueError(f"resume_from {resume_from} has already done {start} steps; ask steps > {start}")
    else:
        history = []
        gen = torch.Generator().manual_seed(int(seed))
        init = {}
        for n in modules:
            w = _base_linear(unet, n).weight
            bound = 1.0 / math.sqrt(w.shape[1])  # kaiming-uniform(a=sqrt(5)) like nn.Linear, B = 0 (standard LoRA)
            A = (torch.rand(rank, w.shape[1], generator=gen) * 2 - 1) * bound
            init[n] = (A, torch.zeros(w.shape[0], rank))
    _add_adapter(unet, name, init, rank)
    edit = Edit(xp, name, "finetune", concepts, [], guide, params, modules, rank,
                base_sha=_fingerprint(unet, modules), history=history)
    params.update(steps=steps, lr=lr, eta=float(eta), batch_size=batch_size, num_samples=num_samples,
                  projections=list(projections), num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale)

    t0 = time.perf_counter()
    # the frozen model's own samples of the concept prompts (the adapter off)
    with edit.disabled():
        per = max(1, math.ceil(num_samples / len(prompts)))
        x0 = xp.generate(prompts, seed=seed, num_images_per_prompt=per, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, height=size[0], width=size[1], output_type="latent",
                         progress=False).images.float()
    owner = torch.arange(x0.shape[0]) // per  # prompt-major
    emb_c = xp.encode_prompt(prompts)
    emb_0 = xp.encode_prompt([t.format(guide) if guide else "" for c in concepts for t in templates])
    train = [p for n in modules for p in _adapter_params(unet.get_submodule(n), name)]
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in train:
            p.requires_grad_(True)
        opt = torch.optim.Adam(train, lr=lr)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        T = xp.num_train_timesteps
        bar = tqdm(range(start, steps), desc=f"finetune {name}", disable=not progress, initial=start, total=steps)
        for step in bar:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
            idx = torch.randint(x0.shape[0], (batch_size,), generator=g)
            t = torch.randint(T, (batch_size,), generator=g)
            noise = torch.randn(batch_size, *x0.shape[1:], generator=g)
            x_t = xp.add_noise(x0[idx], noise.to(x0.device), t)
            e = emb_c.index(owner[idx])
            with torch.no_grad(), edit.disabled():
                e_c = xp.predict_noise(x_t, t, e).float()
                e_0 = xp.predict_noise(x_t, t, emb_0.index(owner[idx])).float()
            target = e_0 - eta * (e_c - e_0)
            pred = xp.predict_noise(x_t, t, e, grad=True).float()
            loss = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for p in train:
            p.requires_grad_(False)
    params["steps_done"] = steps
    edit.edit_time_s = time.perf_counter() - t0
    edit.history = history
    edit._train_state = {"optimizer": opt.state_dict(), "steps_done": steps}
    return edit


# --------------------------------------------------------------------------------------------- ShapesWorld evaluation


def shapesworld_templates(concept: str) -> list[str]:
    """Contexts to embed a ShapesWorld concept in: bare, "a {}", and with every colour (shapes) / shape (colours)."""
    from .shapesworld import COLORS, SHAPES
    from .shapesworld.scene import canonical

    c = canonical(concept)
    if c in SHAPES:
        return ["{}", "a {}"] + [f"a {col} {{}}" for col in COLORS]
    if c in COLORS:
        return ["{}"] + [f"a {{}} {s}" for s in SHAPES]
    raise ValueError(f"{concept!r} is not a ShapesWorld shape or colour; shapes: {', '.join(SHAPES)}; "
                     f"colours: {', '.join(COLORS)}")


def _concept_prompts(word: str, kind: str) -> list[str]:
    from .shapesworld import COLORS, SHAPES

    if kind == "shape":
        return [f"a {word}"] + [f"a {c} {word}" for c in COLORS]
    return [f"a {word} {s}" for s in SHAPES]


def evaluate_shapesworld(xp, concept: str, num_samples: int = 4, seed: int = 0,
                         num_inference_steps: int | None = None, guidance_scale: float | None = None) -> dict:
    """Acc_e, Acc_s, Acc_g and H of the model as it is now (edits applied), judged by the ShapesWorld oracle.

    For a shape X: prompts "a X", "a <colour> X"; Acc_e = share of images with an X; Acc_s = share of the
    other shapes' prompts showing their shape; Acc_g = the same as Acc_e on X's synonyms (SYNONYMS). For a
    colour the prompts are "a X <shape>" and the judged attribute is the colour. ``num_samples`` images per
    prompt. Acc_g is NaN (and H the 2-term mean) for a concept without synonyms.
    """
    from .shapesworld import COLORS, SHAPES, judge
    from .shapesworld.scene import IMAGE_SIZE, SYNONYMS, canonical

    c = canonical(concept)
    kind = "shape" if c in SHAPES else "color" if c in COLORS else None
    if kind is None:
        raise ValueError(f"{concept!r} is not a ShapesWorld shape or colour; shapes: {', '.join(SHAPES)}; "
                         f"colours: {', '.join(COLORS)}")
    values = SHAPES if kind == "shape" else tuple(COLORS)

    def rate(word: str, canon: str) -> float:
        prompts = _concept_prompts(word, kind)
        images = xp.generate(prompts, seed=seed, num_images_per_prompt=num_samples,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             height=IMAGE_SIZE, width=IMAGE_SIZE, progress=False).images
        hits = [any(getattr(o, kind) == canon for o in judge(im)) for im in images]
        return float(np.mean(hits))

    acc_e = rate(c, c)
    others = {v: rate(v, v) for v in values if v != c}
    acc_s = float(np.mean(list(others.values())))
    syns = SYNONYMS.get(c, ())
    acc_g = float(np.mean([rate(s, c) for s in syns])) if syns else float("nan")
    return {"concept": c, "kind": kind, "acc_e": acc_e, "acc_s": acc_s, "acc_g": acc_g,
            "acc_s_per_concept": others, "H": harmonic_h(acc_e, acc_s, acc_g),
            "images_per_prompt": num_samples}
