"""Attention hooks: a recorder of attention probabilities and an editor of attention.

Layers are named like TransformerLens paths, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` (``attn2`` = cross-attention,
``attn1`` = self-attention).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from .manager import CallContext, spatial_shape

BLOCKS = ("down", "mid", "up")


def layer_name(processor_key: str) -> str:
    """``...attn2.processor`` -> ``...attn2``."""
    return processor_key[: -len(".processor")] if processor_key.endswith(".processor") else processor_key


def layer_factor(name: str, num_down_blocks: int) -> int:
    """Downsampling factor of a UNet attention layer relative to the latent (1, 2, 4, ...)."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if m:
        i = int(m.group(2))
        return 2 ** i if m.group(1) == "down" else 2 ** (num_down_blocks - 1 - i)
    if name.startswith("mid_block"):
        return 2 ** (num_down_blocks - 1)
    raise ValueError(f"cannot place attention layer {name!r} in a down/mid/up block")


def layer_block(name: str) -> str:
    return name.split("_", 1)[0] if not name.startswith("mid_block") else "mid"


class LayerFilter:
    """Selects attention layers by kind, block, downsampling factor, name and timestep.

    Args:
        cross: include cross-attention layers (``attn2``).
        self_attention: include self-attention layers (``attn1``).
        blocks: subset of ("down", "mid", "up"); None = all.
        factors: downsampling factors relative to the latent (1 = full latent resolution,
            2 = half, ...); None = all. For SD at 512x512 (64x64 latent), factor 4 = 16x16 maps.
        layers: explicit layer names or regular expressions; None = all.
        timesteps: (t_min, t_max) inclusive range of scheduler timesteps; None = all.
    """

    def __init__(self, cross: bool = True, self_attention: bool = False, blocks: Iterable[str] | None = None,
                 factors: Iterable[int] | None = None, layers: Iterable[str] | None = None,
                 timesteps: tuple[float, float] | None = None):
        if not cross and not self_attention:
            raise ValueError("select at least one of cross=True or self_attention=True")
        self.cross = cross
        self.self_attention = self_attention
        self.blocks = tuple(blocks) if blocks is not None else None
        if self.blocks is not None:
            bad = [b for b in self.blocks if b not in BLOCKS]
            if bad:
                raise ValueError(f"unknown block(s) {bad}; allowed: {', '.join(BLOCKS)}")
        self.factors = tuple(int(f) for f in factors) if factors is not None else None
        self.layer_patterns = list(layers) if layers is not None else None
        if timesteps is not None:
            if len(timesteps) != 2 or timesteps[0] > timesteps[1]:
                raise ValueError(f"timesteps must be (t_min, t_max) with t_min <= t_max, got {timesteps}")
        self.timesteps = timesteps
        self.selected: set[str] = set()
        self.factor_of: dict[str, int] = {}

    def bind(self, unet, processor_keys: list[str]) -> None:
        """Resolve the filter against a UNet's attention layers (called by the HookManager)."""
        num_down = len(unet.down_blocks)
        names = [layer_name(k) for k in processor_keys]
        self.factor_of = {n: layer_factor(n, num_down) for n in names}
        chosen = []
        for n in names:
            kind_ok = (n.endswith("attn2") and self.cross) or (n.endswith("attn1") and self.self_attention)
            if not kind_ok:
                continue
            if self.blocks is not None and layer_block(n) not in self.blocks:
                continue
            if self.factors is not None and self.factor_of[n] not in self.factors:
                continue
            if self.layer_patterns is not None and not any(
                    p == n or re.fullmatch(p, n) for p in self.layer_patterns):
                continue
            chosen.append(n)
        if self.factors is not None:
            have = sorted(set(self.factor_of.values()))
            bad = [f for f in self.factors if f not in have]
            if bad:
                raise ValueError(f"no attention layer at downsampling factor(s) {bad}; this UNet has {have}")
        if self.layer_patterns is not None:
            for p in self.layer_patterns:
                if not any(p == n or re.fullmatch(p, n) for n in names):
                    raise ValueError(f"layer {p!r} matches no attention layer; e.g. {', '.join(names[:3])}, ...")
        if not chosen:
            raise ValueError("the layer filter selects no attention layer of this UNet")
        self.selected = set(chosen)

    def wants(self, processor_key: str, is_cross: bool, ctx: CallContext) -> bool:
        if layer_name(processor_key) not in self.selected:
            return False
        if self.timesteps is not None:
            t = ctx.timestep_value()
            if not self.timesteps[0] <= t <= self.timesteps[1]:
                return False
        return True


class AttentionRecorder(LayerFilter):
    """Records softmax attention probabilities as running sums over UNet calls, on the device.

    For every selected layer it keeps ``sums[layer]``: (images, heads or 1, h, w, keys) float32,
    the sum over recorded UNet calls of the conditional rows' attention probabilities (the
    memory does not grow with the number of steps). ``counts[layer]`` is the number of calls
    summed. With ``per_step=True`` it also keeps ``steps[layer][step]`` (same shape, one call).

    Args (beyond :class:`LayerFilter`):
        heads: head indices to keep; None = all.
        keep_heads: keep heads separate (else they are summed, which is all DAAM needs).
    """

    reads_probs = True

    def __init__(self, *, heads: Iterable[int] | None = None, keep_heads: bool = False, per_step: bool = False,
                 **filters):
        super().__init__(**filters)
        self.heads = list(heads) if heads is not None else None
        self.keep_heads = keep_heads
        self.per_step = per_step
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps: dict[str, dict[int, torch.Tensor]] = {}
        self.timesteps_seen: list[float] = []

    def on_unet_call(self, ctx: CallContext) -> None:
        if self.timesteps is None or self.timesteps[0] <= ctx.timestep_value() <= self.timesteps[1]:
            self.timesteps_seen.append(ctx.timestep_value())

    def on_probs(self, processor_key: str, probs: torch.Tensor, ctx: CallContext) -> None:
        name = layer_name(processor_key)
        p = probs[ctx.cond_slice()]
        if self.heads is not None:
            bad = [h for h in self.heads if not 0 <= h < p.shape[1]]
            if bad:
                raise ValueError(f"head(s) {bad} out of range for layer {name} with {p.shape[1]} heads")
            p = p[:, self.heads]
        p = p.float() if self.keep_heads else p.float().sum(1, keepdim=True)
        h, w = spatial_shape(p.shape[2], ctx.latent_hw)
        p = p.reshape(p.shape[0], p.shape[1], h, w, p.shape[3])
        if name in self.sums:
            self.sums[name] += p
        else:
            self.sums[name] = p.clone()
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.per_step:
            self.steps.setdefault(name, {})[ctx.step] = p.clone()

    @property
    def layers(self) -> list[str]:
        return sorted(self.sums)

    def state_bytes(self) -> int:
        """Bytes held by the running sums (and per-step bins, if any)."""
        n = sum(t.numel() * t.element_size() for t in self.sums.values())
        n += sum(t.numel() * t.element_size() for d in self.steps.values() for t in d.values())
        return n


class AttentionEditor(LayerFilter):
    """A hook point that lets a callable change attention per layer.

    ``fn(layer, tensor, ctx) -> tensor`` receives either the attention probabilities
    (``kind="probs"``: (batch, heads, queries, keys); the layer then computes attention
    explicitly) or the layer's output (``kind="output"``: (batch, queries, channels)), and
    returns the replacement. ``ctx`` (:class:`CallContext`) tells the step, timestep and the
    conditional rows (``ctx.cond_slice()``).
    """

    def __init__(self, fn: Callable[[str, torch.Tensor, CallContext], torch.Tensor], kind: str = "probs",
                 **filters):
        if kind not in ("probs", "output"):
            raise ValueError(f"kind must be 'probs' or 'output', got {kind!r}")
        super().__init__(**filters)
        self.fn = fn
        self.kind = kind
        self.edits_probs = kind == "probs"
        self.edits_output = kind == "output"

    def edit_probs(self, processor_key: str, probs: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        out = self.fn(layer_name(processor_key), probs, ctx)
        if out.shape != probs.shape:
            raise ValueError(f"attention editor returned shape {tuple(out.shape)}, expected {tuple(probs.shape)}")
        return out

    def edit_output(self, processor_key: str, output: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        out = self.fn(layer_name(processor_key), output, ctx)
        if out.shape != output.shape:
            raise ValueError(f"attention editor returned shape {tuple(out.shape)}, expected {tuple(output.shape)}")
        return out
