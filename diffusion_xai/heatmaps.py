"""Token heatmaps (DAAM, Tang et al. 2023): which words drew which pixels.

During generation the :class:`~diffusion_xai.hooks.AttentionRecorder` sums the conditional
cross-attention probabilities of every selected layer over the denoising steps (running sums
on the device). Each layer's (h x w) map is then resized bicubically to a common size (the
latent resolution by default), clamped at 0, and averaged over layers and heads. A word's map
is the mean of its sub-word tokens' maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .hooks import AttentionRecorder
from .results import load_result, save_result
from .tokens import find_word, split_words, word_tokens

DEFAULT_THRESHOLD = 0.4  # DAAM's best tau


def aggregate_maps(recorder: AttentionRecorder, size: tuple[int, int]) -> torch.Tensor:
    """DAAM aggregation of a recorder's cross-attention sums: (images, keys, H, W) float32.

    Every layer's summed map (over steps) is averaged over heads, resized bicubically to
    ``size`` and clamped at 0; the result is the mean over layers.
    """
    total = None
    layers = [n for n in recorder.layers if n.endswith("attn2")]
    if not layers:
        raise RuntimeError("the recorder holds no cross-attention maps (was anything generated under it?)")
    for name in layers:
        s = recorder.sums[name]  # (n, heads or 1, h, w, K)
        m = s.mean(1).permute(0, 3, 1, 2)  # (n, K, h, w)
        m = F.interpolate(m, size=size, mode="bicubic", align_corners=False).clamp_min(0)
        total = m if total is None else total + m
    return total / len(layers)


def normalize(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalise a map to [0, 1] (a constant map becomes 0)."""
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


@dataclass
class HeatmapResult:
    """Per-token and per-word attention heatmaps of generated images.

    Attributes:
        token_maps: (images, tokens, H, W) float32, tokens = positions 0..L-1 of the padded ids
            (0 = BOS), H x W = the map size (the latent resolution by default).
        prompts: the prompt of every image (prompt-major: prompt 0's images first).
        images: the generated PIL images.
        words: for every image, its prompt's words (see :func:`diffusion_xai.tokens.split_words`).
        seed, num_inference_steps, guidance_scale: how the images were made.
        unet_evals: UNet evaluations spent.
        layers: the attention layers that were aggregated.
    """

    token_maps: torch.Tensor
    prompts: list[str]
    images: list[Image.Image] = field(repr=False)
    seed: int = 0
    num_inference_steps: int = 0
    guidance_scale: float = 0.0
    unet_evals: int = 0
    layers: list[str] = field(default_factory=list)
    tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def words(self) -> list[list[str]]:
        return [split_words(p) for p in self.prompts]

    def _positions(self, word: str, image: int, occurrence: int | None) -> list[int]:
        if not 0 <= image < len(self.prompts):
            raise ValueError(f"image {image} out of range; this result has {len(self.prompts)} images")
        if self.tokenizer is not None:
            return find_word(self.tokenizer, self.prompts[image], word, occurrence)
        table = self._token_table[image]
        hits = [w for w in table if w["word"] == word.lower()]
        if not hits:
            raise ValueError(f"word {word!r} is not in prompt {self.prompts[image]!r}; "
                             f"words: {', '.join(self.words[image])}")
        if occurrence is not None:
            hits = [w for w in hits if w["occurrence"] == occurrence]
        return [p for w in hits for p in w["positions"]]

    def word_map(self, word: str, image: int = 0, occurrence: int | None = None) -> torch.Tensor:
        """(H, W) map of a word: the mean of its tokens' maps (all occurrences unless one is chosen)."""
        pos = self._positions(word, image, occurrence)
        return self.token_maps[image, pos].mean(0)

    def mask(self, word: str, image: int = 0, threshold: float = DEFAULT_THRESHOLD,
             size: tuple[int, int] | None = None, occurrence: int | None = None) -> torch.Tensor:
        """Binary mask: min-max normalised word map >= threshold, optionally resized (bicubic) first."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        m = self.word_map(word, image, occurrence)
        if size is not None:
            m = F.interpolate(m[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
        return normalize(m) >= threshold

    def image_map(self, word: str, image: int = 0, occurrence: int | None = None) -> np.ndarray:
        """The normalised word map resized to the image's pixel size: (height, width) float in [0, 1]."""
        w, h = self.images[image].size
        m = self.word_map(word, image, occurrence)
        m = F.interpolate(m[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        return normalize(m).numpy()

    def overlay(self, word: str, image: int = 0, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
        """The image with the word's map blended on top (PIL RGB)."""
        import matplotlib

        heat = matplotlib.colormaps[cmap](self.image_map(word, image))[:, :, :3]
        base = np.asarray(self.images[image].convert("RGB")).astype(np.float32) / 255.0
        out = (1 - alpha) * base + alpha * heat
        return Image.fromarray((out * 255).round().astype(np.uint8))

    def plot(self, image: int = 0, words: list[str] | None = None, ncols: int = 6):
        """A matplotlib figure: the image, then one overlay per (content) word."""
        import matplotlib.pyplot as plt

        words = words or [w for w in dict.fromkeys(self.words[image]) if w.isalnum()]
        n = len(words) + 1
        cols = min(ncols, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        axes.flat[0].imshow(self.images[image])
        axes.flat[0].set_title("image", fontsize=9)
        for ax, w in zip(list(axes.flat)[1:], words):
            ax.imshow(self.overlay(w, image))
            ax.set_title(w, fontsize=9)
        fig.suptitle(self.prompts[image], fontsize=10)
        fig.tight_layout()
        return fig

    # ---------------------------------------------------------------- persistence
    @property
    def _token_table(self) -> list[list[dict]]:
        return self.meta_tokens

    def to_dict(self) -> dict:
        """JSON-safe metadata (no tensors)."""
        return {"prompts": self.prompts, "seed": self.seed, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "unet_evals": self.unet_evals, "layers": self.layers,
                "map_size": list(self.token_maps.shape[-2:]), "words": self.words,
                "tokens": self._tokens_meta()}

    def _tokens_meta(self) -> list[list[dict]]:
        if self.tokenizer is None:
            return self.meta_tokens
        return [[{"word": w.word, "occurrence": w.occurrence, "positions": w.positions}
                 for w in word_tokens(self.tokenizer, p)] for p in self.prompts]

    def save(self, folder: str | Path) -> Path:
        """Write maps (safetensors), metadata (JSON) and the images (PNG) into ``folder``."""
        folder = Path(folder)
        save_result(folder, {"token_maps": self.token_maps}, self.to_dict(), kind="heatmaps")
        for i, im in enumerate(self.images):
            im.save(folder / f"image_{i}.png")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HeatmapResult:
        folder = Path(folder)
        tensors, meta = load_result(folder, "heatmaps")
        images = [Image.open(folder / f"image_{i}.png").convert("RGB") for i in range(len(meta["prompts"]))]
        r = cls(tensors["token_maps"], meta["prompts"], images, meta["seed"], meta["num_inference_steps"],
                meta["guidance_scale"], meta["unet_evals"], meta["layers"])
        r.meta_tokens = meta["tokens"]
        return r


def compute_heatmaps(xp, prompt, seed: int = 0, num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                     num_images_per_prompt: int = 1, negative_prompt=None, words: list[str] | None = None,
                     map_size: tuple[int, int] | None = None, progress: bool = True,
                     **filters) -> HeatmapResult:
    """Generate images and their DAAM token heatmaps.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        prompt: a prompt or a list of prompts.
        words: words that must be in every prompt (checked before generating: a clear error
            instead of wasted compute).
        map_size: (H, W) of the maps; default the latent resolution.
        **filters: layer filters of :class:`~diffusion_xai.hooks.AttentionRecorder`
            (``blocks``, ``factors``, ``layers``, ``timesteps``, ``heads``).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    tok = xp.pipe.tokenizer
    for p in prompts:
        for w in words or []:
            find_word(tok, p, w)
        if xp.is_sdxl:
            from .tokens import check_same_positions

            check_same_positions(xp.tokenizers, p)
    recorder = AttentionRecorder(cross=True, **filters)
    evals0 = xp.unet_evals
    with xp.hooks(recorder):
        out = xp.generate(prompts, seed=seed, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width,
                          num_images_per_prompt=num_images_per_prompt, negative_prompt=negative_prompt,
                          progress=progress)
    images = out.images
    W, H = images[0].size
    size = map_size or (H // xp.vae_scale_factor, W // xp.vae_scale_factor)
    maps = aggregate_maps(recorder, size).cpu()
    steps = num_inference_steps or xp.default_steps
    return HeatmapResult(
        token_maps=maps, prompts=[p for p in prompts for _ in range(num_images_per_prompt)], images=images,
        seed=seed, num_inference_steps=steps,
        guidance_scale=xp.default_guidance if guidance_scale is None else guidance_scale,
        unet_evals=xp.unet_evals - evals0, layers=recorder.layers, tokenizer=tok)
