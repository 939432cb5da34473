"""The one hook manager: installs hooks on a UNet and always restores it.

Attention hooks go through diffusers' public processor API: every selected attention module
gets a :class:`HookedAttnProcessor` that delegates to the processor that was there. Module
hooks are plain torch forward hooks. Leaving the ``with`` block (normally, by an exception or
by Ctrl-C) puts back the exact processor objects and removes every handle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CallContext:
    """What the hooks need to know about the current UNet call.

    ``num_images`` is the number of images of the call (prompts x images per prompt); a UNet
    batch of ``k * num_images`` rows holds ``k`` classifier-free-guidance chunks, the
    conditional one last (diffusers' SD and SDXL pipelines concatenate [uncond, cond]).
    ``None`` means every row is conditional (analysis calls through ``predict_noise``).
    """

    num_images: int | None = None
    step: int = -1  # index of the UNet call within the current generation
    timestep: torch.Tensor | None = None  # the timestep(s) of the current UNet call
    latent_hw: tuple[int, int] | None = None  # (H, W) of the latent of the current call
    batch: int = 0  # rows of the current UNet call
    extra: dict[str, Any] = field(default_factory=dict)

    def cond_slice(self) -> slice:
        """Rows of the conditional half of the current UNet batch."""
        if not self.num_images:
            return slice(0, self.batch)
        if self.batch % self.num_images:
            raise RuntimeError(f"UNet batch of {self.batch} rows is not a multiple of {self.num_images} images")
        return slice(self.batch - self.num_images, self.batch)

    def timestep_value(self) -> float:
        t = self.timestep
        if t is None:
            return float("nan")
        return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)


def spatial_shape(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention layer with ``num_tokens`` queries inside a latent of (H, W)."""
    H, W = latent_hw
    f = 1
    while f <= max(H, W):
        h, w = math.ceil(H / f), math.ceil(W / f)
        if h * w == num_tokens:
            return h, w
        f *= 2
    raise RuntimeError(f"cannot place {num_tokens} attention queries on a latent grid of {H}x{W}")


class HookedAttnProcessor:
    """Delegating attention processor: runs the original processor, lets hooks look and edit.

    Hooks that only *read* attention probabilities get them computed separately (queries and
    keys only), so the layer's output is the original processor's, bit for bit. Hooks that
    *edit* probabilities make this layer compute attention explicitly.
    """

    def __init__(self, base, name: str, manager: HookManager):
        self.base = base
        self.name = name
        self.manager = manager

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        hooks = [h for h in self.manager.attention_hooks if h.wants(self.name, is_cross, self.manager.context)]
        if not hooks:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        ctx = self.manager.context
        editors = [h for h in hooks if getattr(h, "edits_probs", False)]
        readers = [h for h in hooks if getattr(h, "reads_probs", False)]
        if editors:
            out, probs = self._explicit(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        editors, ctx)
        else:
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
            probs = self._probs(attn, hidden_states, encoder_hidden_states, attention_mask) if readers else None
        for h in readers:
            h.on_probs(self.name, probs, ctx)
        for h in hooks:
            if getattr(h, "edits_output", False):
                out = h.edit_output(self.name, out, ctx)
        return out

    @staticmethod
    def _qk(attn, hidden_states, encoder_hidden_states, attention_mask):
        x = hidden_states
        if attn.spatial_norm is not None:
            raise NotImplementedError("attention with spatial_norm is not hooked (VAE-only in SD)")
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(x)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.to_k(ctx)
        q, k = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        mask = attn.prepare_attention_mask(attention_mask, k.shape[1], x.shape[0]) if attention_mask is not None else None
        return x, ctx, q, k, mask

    def _probs(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> torch.Tensor:
        """Softmax attention probabilities, (batch, heads, queries, keys)."""
        with torch.no_grad():
            x, _, q, k, mask = self._qk(attn, hidden_states, encoder_hidden_states, attention_mask)
            p = attn.get_attention_scores(q, k, mask)
        return p.view(x.shape[0], attn.heads, p.shape[1], p.shape[2])

    def _explicit(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, editors, ctx):
        residual = hidden_states
        in_ndim = hidden_states.ndim
        x, context, q, k, mask = self._qk(attn, hidden_states, encoder_hidden_states, attention_mask)
        p = attn.get_attention_scores(q, k, mask)
        p = p.view(x.shape[0], attn.heads, p.shape[1], p.shape[2])
        for e in editors:
            p = e.edit_probs(self.name, p, ctx)
        v = attn.head_to_batch_dim(attn.to_v(context))
        out = torch.bmm(p.reshape(-1, p.shape[2], p.shape[3]).to(v.dtype), v)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if in_ndim == 4:
            b, c, h, w = residual.shape
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor, p


class HookManager:
    """Context manager that installs hooks on a UNet and restores it exactly on exit.

    Example::

        rec = AttentionRecorder()
        with HookManager(pipe.unet, [rec]):
            pipe("a red circle")
        rec.maps()  # running sums per layer
    """

    def __init__(self, unet: torch.nn.Module, hooks=(), num_images: int | None = None):
        self.unet = unet
        self.hooks = list(hooks)
        self.context = CallContext(num_images=num_images)
        self._saved_processors: dict | None = None
        self._handles: list = []
        self.active = False

    @property
    def attention_hooks(self):
        return [h for h in self.hooks if hasattr(h, "wants")]

    def attention_layer_names(self) -> list[str]:
        return list(self.unet.attn_processors)

    def __enter__(self) -> HookManager:
        if self.active:
            raise RuntimeError("this HookManager is already active; create a new one to nest hooks")
        names = self.attention_layer_names()
        for h in self.hooks:
            if hasattr(h, "bind"):
                h.bind(self.unet, names)
        try:
            self._saved_processors = dict(self.unet.attn_processors)
            if self.attention_hooks:
                wrapped = {n: HookedAttnProcessor(p, n, self) for n, p in self._saved_processors.items()}
                self.unet.set_attn_processor(wrapped)
            self._handles.append(self.unet.register_forward_pre_hook(self._pre_unet, with_kwargs=True))
            for h in self.hooks:
                if hasattr(h, "install"):
                    self._handles.extend(h.install(self.unet, self))
        except BaseException:
            self._restore()
            raise
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._saved_processors is not None:
            current = self.unet.attn_processors
            if any(current[n] is not p for n, p in self._saved_processors.items()):
                self.unet.set_attn_processor(self._saved_processors)
            self._saved_processors = None
        self.active = False

    def _pre_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        c = self.context
        c.step += 1
        c.timestep = t
        c.batch = sample.shape[0]
        c.latent_hw = (sample.shape[-2], sample.shape[-1])
        for h in self.hooks:
            if hasattr(h, "on_unet_call"):
                h.on_unet_call(c)
        return None

    def reset_steps(self, num_images: int | None) -> None:
        """Start a new generation (or analysis call) with ``num_images`` images."""
        self.context.step = -1
        self.context.num_images = num_images
