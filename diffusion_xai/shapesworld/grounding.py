"""Token grounding for training: cross-attention of a caption word should fall on its object.

ShapesWorld knows which object every caption word describes and where that object is, so the
fine-tuning stage can add a grounding term to the denoising loss (the token loss of TokenCompose,
Wang et al. 2024): for every grounded token ``j`` of a caption and every selected cross-attention
layer, the share of the token's attention mass that falls inside its object,

    share_j = sum_p A[p, j] m_o(j)[p] / sum_p A[p, j],

where ``A`` is the layer's softmax attention (mean over heads; rows are image positions) and
``m`` the object's mask as area fractions at the layer's resolution, enters as ``(1 - share_j)^2``,
averaged over the grounded tokens of the batch. Words that describe no object (function words)
and captions dropped for classifier-free guidance are not grounded. The pixel term
(:func:`pixel_grounding_loss`, TokenCompose's pixel loss in a squared form) asks the converse: a
position inside an object attends to that object's words.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import AttentionEditor, HookManager
from .scene import Scene

MAX_OBJECTS = 3


def token_owners(scene: Scene, tok, length: int = 77, cache: dict | None = None) -> np.ndarray:
    """(length,) int8: the object index each token of ``scene.caption`` describes, -1 for none.

    Token 0 is the start token; caption words are spaces apart and a comma is glued to its word
    (and tokenised apart from it), as :func:`~diffusion_xai.shapesworld.scene.build_scene` writes them.
    """
    cache = {} if cache is None else cache

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = len(tok(text, add_special_tokens=False).input_ids)
        return cache[text]

    pieces = scene.caption.split(" ")
    if len(pieces) != len(scene.words):
        raise ValueError(f"caption {scene.caption!r} does not split into its {len(scene.words)} words")
    owners = np.full(length, -1, dtype=np.int8)
    pos = 1
    for piece, word, owner in zip(pieces, scene.words, scene.word_objects):
        n = count(word)
        if owner is not None and pos < length:
            owners[pos:min(length, pos + n)] = owner
        pos += count(piece)
    return owners


def object_masks(scene: Scene, res: int) -> np.ndarray:
    """(MAX_OBJECTS, res, res) float32: each object's area fraction per cell of a res x res grid."""
    out = np.zeros((MAX_OBJECTS, res, res), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        k = obj.mask.shape[0] // res
        out[i] = obj.mask.reshape(res, k, res, k).mean(axis=(1, 3))
    return out


def _layers(probs: dict[str, torch.Tensor], masks: torch.Tensor):
    """Per layer: attention averaged over heads (batch, h*w, keys) and the masks pooled to its grid
    (batch, objects, h*w)."""
    for p in probs.values():
        a = p.mean(1)
        side = int(round(a.shape[1] ** 0.5))
        yield a, F.adaptive_avg_pool2d(masks, side).flatten(2)


def grounding_loss(probs: dict[str, torch.Tensor], owners: torch.Tensor, masks: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``(1 - share)^2`` over grounded tokens and layers.

    Args:
        probs: layer -> attention probabilities (batch, heads, h * w, keys), square layers.
        owners: (batch, keys) long, object index per token, -1 for none.
        masks: (batch, MAX_OBJECTS, H, W) area fractions at the finest layer resolution; coarser
            layers average-pool them (exact for area fractions).
        valid: (batch,) bool, rows to ground (False: a dropped caption); None = all.
    """
    grounded = owners >= 0
    if valid is not None:
        grounded = grounded & valid[:, None]
    n = grounded.sum()
    if n == 0 or not probs:
        return masks.new_zeros(())
    total = masks.new_zeros(())
    for a, m in _layers(probs, masks):
        a = a.transpose(1, 2)  # (batch, keys, h*w)
        mt = torch.gather(m, 1, owners.clamp(min=0)[:, :, None].expand(-1, -1, m.shape[-1]))
        share = (a * mt).sum(-1) / a.sum(-1).clamp_min(1e-8)
        total = total + (((1 - share) ** 2) * grounded).sum() / n
    return total / len(probs)


def pixel_grounding_loss(probs: dict[str, torch.Tensor], owners: torch.Tensor, masks: torch.Tensor,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """The pixel side of grounding: inside an object, attention should go to that object's own words.

    For every position ``p`` and object ``k``, ``own_k(p) = sum_{j: owner(j) = k} A[p, j]``; the loss
    is ``sum m_k(p) (1 - own_k(p))^2 / sum m_k(p)`` over objects, positions and layers (``m``: area
    fractions, as in :func:`grounding_loss`). Background positions are free. It keeps an object's
    pixels from reading the other objects' words or the padding tokens, which carry the whole
    caption (a bag of every colour and shape) in a causal text encoder.
    """
    if valid is None:
        valid = torch.ones(owners.shape[0], dtype=torch.bool, device=owners.device)
    total = masks.new_zeros(())
    if not probs or not valid.any():
        return total
    own = F.one_hot(owners.clamp(min=0), MAX_OBJECTS).to(masks.dtype) * (owners >= 0)[..., None]  # (b, keys, obj)
    for a, m in _layers(probs, masks):
        m = m * valid[:, None, None]
        own_mass = torch.einsum("bpk,bko->bop", a, own)
        total = total + ((1 - own_mass) ** 2 * m).sum() / m.sum().clamp_min(1e-8)
    return total / len(probs)


class AttentionTap:
    """Cross-attention probabilities of selected layers, kept with their gradients for one UNet call.

    Use as ``with tap.installed(unet): ...``; ``tap.probs`` holds the last call's layers."""

    def __init__(self, factors=(1, 2)):
        self.factors = tuple(factors)
        self.probs: dict[str, torch.Tensor] = {}

    def _keep(self, layer: str, p: torch.Tensor, ctx) -> torch.Tensor:
        self.probs[layer] = p
        return p

    def installed(self, unet) -> HookManager:
        return HookManager(unet, [AttentionEditor(self._keep, kind="probs", cross=True, factors=self.factors)])
