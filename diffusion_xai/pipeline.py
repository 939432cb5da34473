"""XAIPipeline: the one wrapper around a diffusers Stable Diffusion pipeline.

Every method of diffusion-xai goes through the primitives defined here:
``encode_prompt`` / ``encode_image`` / ``add_noise`` / ``t_to_logsnr`` / ``logsnr_to_t`` /
``predict_noise`` (the single place where the UNet runs for analysis) and ``generate`` (which
calls the wrapped pipeline itself, under whatever hooks are active).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .hooks import HookManager
from .tokens import validate_prompt

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


@dataclass
class PromptEmbeddings:
    """Text conditioning of a batch of prompts.

    Attributes:
        embeds: (B, L, D) token embeddings fed to cross-attention (L = 77 for CLIP).
        pooled: (B, D2) pooled embedding of SDXL's second encoder; None for SD 1.x/2.x.
        prompts: the prompt strings, one per row.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    prompts: list[str]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx) -> PromptEmbeddings:
        """Rows ``idx`` (a tensor or list of row indices)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.embeds.device)
        prompts = [self.prompts[int(i)] for i in idx.cpu()]
        pooled = self.pooled[idx.to(self.pooled.device)] if self.pooled is not None else None
        return PromptEmbeddings(self.embeds[idx], pooled, prompts)

    @staticmethod
    def cat(items: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = None if items[0].pooled is None else torch.cat([e.pooled for e in items])
        return PromptEmbeddings(torch.cat([e.embeds for e in items]), pooled, [p for e in items for p in e.prompts])


def validate_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


class XAIPipeline:
    """Wraps a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Args:
        pipe: the diffusers pipeline (SD 1.x, 2.x with epsilon or v-prediction, SDXL).
        batch_size: most rows per UNet call in :meth:`predict_noise` (the memory budget).
        default_steps / default_guidance: used by :meth:`generate` when not given.

    The wrapped pipeline is never changed: hooks are removed when their ``with`` block ends.
    """

    def __init__(self, pipe, batch_size: int = 16, default_steps: int | None = None,
                 default_guidance: float | None = None):
        name = type(pipe).__name__
        if name not in SUPPORTED_PIPELINES:
            raise TypeError(f"unsupported pipeline {name}; supported: {', '.join(SUPPORTED_PIPELINES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipe = pipe
        self.is_sdxl = name == "StableDiffusionXLPipeline"
        self.batch_size = int(batch_size)
        self.default_steps = default_steps or 30
        self.default_guidance = default_guidance if default_guidance is not None else 7.5
        self.unet_evals = 0
        self._prompt_cache: dict[str, PromptEmbeddings] = {}
        self._managers: list[HookManager] = []
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TypeError(f"unsupported prediction_type {self.prediction_type!r}; supported: epsilon, v_prediction")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype | None = None, device: str | None = None,
                        **kwargs) -> XAIPipeline:
        """Load a pipeline from a local folder or hub id (``DiffusionPipeline.from_pretrained``)."""
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path_or_id, torch_dtype=torch_dtype, **kwargs)
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe)

    @classmethod
    def shapesworld(cls, device: str | None = None) -> XAIPipeline:
        """The embedded ShapesWorld model (no network), with its documented sampling defaults."""
        from .shapesworld import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapesworld_pipeline

        pipe = load_shapesworld_pipeline()
        if device is not None:
            pipe = pipe.to(device)
        return cls(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)

    # ------------------------------------------------------------------ properties
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def tokenizers(self) -> list:
        toks = [self.pipe.tokenizer]
        if self.is_sdxl and getattr(self.pipe, "tokenizer_2", None) is not None:
            toks.append(self.pipe.tokenizer_2)
        return toks

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t of the model's own scheduler, (T,) float64 on the CPU."""
        return self.pipe.scheduler.alphas_cumprod.double().cpu()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def hooks(self, *hooks):
        """Install hooks on the UNet for the ``with`` block; :meth:`generate` tells them the CFG layout."""
        manager = HookManager(self.unet, hooks)
        with manager:
            self._managers.append(manager)
            try:
                yield manager
            finally:
                self._managers.remove(manager)

    def _start_call(self, num_images: int | None) -> None:
        for m in self._managers:
            m.reset_steps(num_images)

    # ------------------------------------------------------------------ primitives
    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> PromptEmbeddings:
        """Text embeddings of prompts (cached per text). "" encodes the empty prompt (not zeros)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            if self.is_sdxl:
                e, _, pooled, _ = self.pipe.encode_prompt(missing, device=self.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
            else:
                e, _ = self.pipe.encode_prompt(missing, self.device, 1, False)
                pooled = None
            for i, p in enumerate(missing):
                self._prompt_cache[p] = PromptEmbeddings(e[i:i + 1], None if pooled is None else pooled[i:i + 1], [p])
        return PromptEmbeddings.cat([self._prompt_cache[p] for p in prompts])

    def _images_to_tensor(self, images) -> torch.Tensor:
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images[None]
            if x.shape[1] != 3:
                raise ValueError(f"image tensors must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
            return x.float()
        arrays = []
        for im in images:
            if isinstance(im, Image.Image):
                if im.mode != "RGB":
                    raise ValueError(f"image mode {im.mode!r} is not supported; allowed: 'RGB' "
                                     f"(convert with image.convert('RGB'))")
                im = np.asarray(im)
            im = np.asarray(im)
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"image arrays must be (H, W, 3) RGB, got shape {im.shape}")
            if im.dtype != np.uint8:
                raise ValueError(f"image arrays must be uint8, got {im.dtype}")
            arrays.append(im)
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all images of a batch must have one size, got {sorted(shapes)}")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """VAE latents (posterior mean x scaling factor) of images: (B, 4, H/8, W/8).

        ``images``: a PIL RGB image, a uint8 (H, W, 3) / (B, H, W, 3) array, a list of those, or
        a (B, 3, H, W) tensor in [-1, 1]. Height and width must be multiples of the VAE factor.
        """
        x = self._images_to_tensor(images)
        f = self.vae_scale_factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"image size {w}x{h} is not allowed; width and height must be multiples of {f}")
        vae = self.pipe.vae
        x = x.to(self.device, vae.dtype)
        lat = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images of latents (inverse of :meth:`encode_image`)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        x = vae.decode((latents.to(self.device, vae.dtype) / vae.config.scaling_factor) + shift).sample
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def _timesteps(self, t, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long).flatten().cpu()
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"got {t.numel()} timesteps for {n} latents; give one or one per latent")
        T = self.num_train_timesteps
        if (t < 0).any() or (t >= T).any():
            raise ValueError(f"timesteps must be in [0, {T - 1}], got {t.min().item()}..{t.max().item()}")
        return t

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with the model's own schedule."""
        t = self._timesteps(t, latents.shape[0])
        a = self.alphas_cumprod[t].to(latents.device, torch.float32).view(-1, *[1] * (latents.ndim - 1))
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def t_to_logsnr(self, t) -> torch.Tensor:
        """logSNR a = log(abar / (1 - abar)) of trained timesteps, float64."""
        a = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long)]
        return torch.log(a / (1 - a))

    def logsnr_to_t(self, logsnr) -> torch.Tensor:
        """The trained timestep whose logSNR is nearest to each given value (long)."""
        table = self.t_to_logsnr(torch.arange(self.num_train_timesteps))
        a = torch.as_tensor(logsnr, dtype=torch.float64)
        return (a.reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(-1).reshape(a.shape)

    def _added_cond(self, emb: PromptEmbeddings, hw: tuple[int, int], n: int,
                    device: torch.device | None = None) -> dict | None:
        if not self.is_sdxl:
            return None
        device = device or self.device
        H, W = hw[0] * self.vae_scale_factor, hw[1] * self.vae_scale_factor
        ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=emb.embeds.dtype, device=device).expand(n, 6)
        return {"text_embeds": emb.pooled.to(device), "time_ids": ids}

    def predict_noise(self, x_t: torch.Tensor, t, embeddings: PromptEmbeddings, batch_size: int | None = None,
                      grad: bool = False) -> torch.Tensor:
        """Noise prediction eps_hat(x_t, t, c): THE single place where the UNet runs for analysis.

        Args:
            x_t: (N, C, h, w) noised latents.
            t: one timestep or (N,) timesteps (trained indices, 0..T-1).
            embeddings: :class:`PromptEmbeddings` with 1 row (shared) or N rows.
            batch_size: rows per UNet call (default: the wrapper's budget).
            grad: keep the autograd graph (e.g. to optimise embeddings).
        Returns:
            (N, C, h, w) epsilon predictions (v-prediction models are converted), x_t's dtype.
            ``self.unet_evals`` grows by N.
        """
        n = x_t.shape[0]
        t = self._timesteps(t, n)
        if len(embeddings) not in (1, n):
            raise ValueError(f"embeddings have {len(embeddings)} rows for {n} latents; give 1 or {n}")
        bs = batch_size or self.batch_size
        self._start_call(None)
        outs = []
        # diffusers finds a model's device and dtype by walking its modules: once per call, not per batch
        dev, dt = self.device, self.dtype
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            for i in range(0, n, bs):
                x = x_t[i:i + bs].to(dev, dt)
                tt = t[i:i + bs].to(dev)
                e = embeddings if len(embeddings) == 1 else embeddings.index(range(i, i + x.shape[0]))
                enc = e.embeds.to(dev, dt)
                if enc.shape[0] == 1:
                    enc = enc.expand(x.shape[0], -1, -1)
                if self.is_sdxl and e.pooled is not None and e.pooled.shape[0] == 1:
                    e = PromptEmbeddings(e.embeds, e.pooled.expand(x.shape[0], -1), e.prompts)
                out = self.unet(x, tt, encoder_hidden_states=enc,
                                added_cond_kwargs=self._added_cond(e, x.shape[-2:], x.shape[0], dev)).sample
                if self.prediction_type == "v_prediction":
                    a = self.alphas_cumprod.to(dev)[tt].to(out.dtype).view(-1, 1, 1, 1)
                    out = (1 - a).sqrt() * x + a.sqrt() * out
                outs.append(out.to(x_t.dtype))
                self.unet_evals += x.shape[0]
        return torch.cat(outs)

    def generate(self, prompt: str | Sequence[str], seed: int = 0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, negative_prompt: str | Sequence[str] | None = None,
                 output_type: str = "pil", progress: bool = True, tweaks=None, **kwargs):
        """Generate with the wrapped diffusers pipeline (under active hooks), seeded.

        Returns the pipeline's output (``.images``: PIL images, or arrays for ``output_type="np"``),
        ordered prompt-major: prompt 0's images first. Extra keyword arguments go to the pipeline.
        ``tweaks``: embedding / attention tweaks (:mod:`diffusion_xai.tweaks`), applied to the
        conditional branch for this call only.
        """
        if tweaks:
            from .tweaks import generate_with_tweaks

            return generate_with_tweaks(self, prompt, tweaks, seed=seed, num_inference_steps=num_inference_steps,
                                        guidance_scale=guidance_scale, height=height, width=width,
                                        num_images_per_prompt=num_images_per_prompt,
                                        negative_prompt=negative_prompt, output_type=output_type,
                                        progress=progress, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts and "prompt_embeds" not in kwargs:
            raise ValueError("give at least one prompt")
        for p in prompts:
            validate_prompt(p)
        seed = validate_seed(seed)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        steps = num_inference_steps or self.default_steps
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if v is not None and (v <= 0 or v % f):
                raise ValueError(f"{name} {v} is not allowed; use a positive multiple of {f}")
        self.pipe.set_progress_bar_config(disable=not progress)
        generator = torch.Generator("cpu").manual_seed(seed)
        n_images = (len(prompts) or kwargs["prompt_embeds"].shape[0]) * num_images_per_prompt
        self._start_call(n_images)
        call = dict(num_inference_steps=steps,
                    guidance_scale=self.default_guidance if guidance_scale is None else guidance_scale,
                    height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                    negative_prompt=negative_prompt, generator=generator, output_type=output_type, **kwargs)
        if prompts:
            call["prompt"] = prompts
        with torch.no_grad():
            out = self.pipe(**call)
        self.unet_evals += n_images * steps * (2 if call["guidance_scale"] > 1 else 1)
        return out

    # ------------------------------------------------------------------ methods
    def heatmaps(self, prompt, **kwargs):
        """Token heatmaps (DAAM) of a generation; see :func:`diffusion_xai.heatmaps.compute_heatmaps`."""
        from .heatmaps import compute_heatmaps

        return compute_heatmaps(self, prompt, **kwargs)

    def information(self, image_or_latent, prompt, **kwargs):
        """Pointwise (conditional) mutual information of words with an image; see
        :func:`diffusion_xai.information.information`."""
        from .information import information

        return information(self, image_or_latent, prompt, **kwargs)

    def pid(self, image_or_prompt, word1, word2, **kwargs):
        """DiffusionPID maps of a word pair; see :func:`diffusion_xai.information.pid`."""
        from .information import pid

        return pid(self, image_or_prompt, word1, word2, **kwargs)

    def erase(self, concepts, **kwargs):
        """Erase concepts as a reversible LoRA adapter on the UNet; see :func:`diffusion_xai.erasure.erase`."""
        from .erasure import erase

        return erase(self, concepts, **kwargs)

    def classify(self, images, classes, **kwargs):
        """Zero-shot classification (Diffusion Classifier); see :func:`diffusion_xai.classifier.classify`."""
        from .classifier import classify

        return classify(self, images, classes, **kwargs)

    def localize_inconsistency(self, image, text, **kwargs):
        """Which words of a caption and which pixels of an image disagree (D-TIIL); see
        :func:`diffusion_xai.inconsistency.localize_inconsistency`."""
        from .inconsistency import localize_inconsistency

        return localize_inconsistency(self, image, text, **kwargs)
