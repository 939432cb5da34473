"""Judges: what an audit reads off every generated image, behind one interface.

A judge is called as ``judge(images, prompts, attributes) -> list[Verdict]``: for every image (PIL) and
the prompt that made it, the value of every spec attribute it shows (``None`` when it cannot tell), the
concepts it detected (for the Jaccard hallucination of Vice et al.) and whether the image misses its
prompt (the generative miss rate). Three judges:

* :class:`OracleJudge` -- the ShapesWorld oracle (:func:`diffusion_xai.shapesworld.judge`), exact on renders.
* :class:`ModelJudge` -- :class:`~diffusion_xai.classifier.DiffusionJudge`: the diffusion model judges its
  own images zero-shot (no extra model). Miss: the model's denoising error is lower with the empty
  prompt "" than with the image's prompt (paired noises and timesteps).
* :class:`CLIPJudge` -- zero-shot CLIP (transformers ``CLIPModel``) from a checkpoint folder. Miss: the
  image is closer (cosine) to "" than to its prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .spec import JUDGES, AttributeSpec, AuditSpec


@dataclass
class Verdict:
    """What a judge saw in one image.

    Attributes:
        labels: {attribute: judged value or None}.
        detected: every concept (attribute value) the judge detected in the image.
        miss: True when the image misses its prompt (None when the judge was not asked).
    """

    labels: dict[str, str | None]
    detected: list[str] = field(default_factory=list)
    miss: bool | None = None


class Judge:
    """Base class: ``judge(images, prompts, attributes) -> list[Verdict]`` (one per image)."""

    name = "judge"

    def __call__(self, images: Sequence, prompts: Sequence[str], attributes: dict[str, AttributeSpec],
                 miss_rate: bool = True) -> list[Verdict]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ oracle
class OracleJudge(Judge):
    """The ShapesWorld oracle. The judged object is the largest one whose shape the prompt names (the
    largest of all when it names none); attributes are ``shape``, ``color``, ``size`` and ``position``.
    Miss: some attribute value the prompt mentions (synonyms mapped) is not seen on any object."""

    name = "oracle"
    ATTRIBUTES = ("shape", "color", "size", "position")

    def __call__(self, images, prompts, attributes, miss_rate: bool = True) -> list[Verdict]:
        from ..shapesworld import judge as oracle
        from ..shapesworld.scene import attribute_values, canonical

        bad = [a for a in attributes if a not in self.ATTRIBUTES]
        if bad:
            raise ValueError(f"the oracle judge reads only {', '.join(self.ATTRIBUTES)}; the spec asks {bad}")
        vocab = {v for a in self.ATTRIBUTES for v in attribute_values(a)}
        out = []
        for image, prompt in zip(images, prompts):
            objs = oracle(image)
            mentioned = {canonical(w.strip(",.")) for w in prompt.lower().split()} & vocab
            named = [o for o in objs if o.shape in mentioned] or objs
            obj = max(named, key=lambda o: int(o.mask.sum())) if named else None
            labels = {}
            for a, spec in attributes.items():
                v = getattr(obj, a) if obj is not None else None
                labels[a] = v if v in spec.values else None
            detected = sorted({getattr(o, a) for o in objs for a in self.ATTRIBUTES})
            out.append(Verdict(labels, detected, (not objs or not mentioned <= set(detected)) if miss_rate else None))
        return out


# ------------------------------------------------------------------------------------------------ model
def prefers_empty(xp, images, prompts: Sequence[str], num_timesteps: int = 8, seed: int = 0) -> list[bool]:
    """For every image: is the model's denoising error lower given "" than given its prompt?

    The same ``num_timesteps`` evenly spaced timesteps and seeded noises serve both conditions and every
    image (paired differences); ``2 * num_timesteps`` UNet evaluations per image.
    """
    x0 = xp.encode_image(list(images))
    B, T = x0.shape[0], int(num_timesteps)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((T, *x0.shape[1:]), generator=g).to(x0.device, x0.dtype)
    n = xp.num_train_timesteps
    ts = torch.linspace(n * 0.05, n * 0.95, T).round().long()
    x = x0.repeat_interleave(T, 0)
    eps = noise.repeat(B, 1, 1, 1)
    t = ts.repeat(B)
    x_t = xp.add_noise(x, eps, t)
    rows = [p for p in prompts for _ in range(T)]
    err_p = ((xp.predict_noise(x_t, t, xp.encode_prompt(rows)) - eps) ** 2).flatten(1).mean(1)
    err_0 = ((xp.predict_noise(x_t, t, xp.encode_prompt([""])) - eps) ** 2).flatten(1).mean(1)
    diff = (err_p - err_0).view(B, T).mean(1)
    return [bool(d > 0) for d in diff.tolist()]


class ModelJudge(Judge):
    """:class:`~diffusion_xai.classifier.DiffusionJudge` behind the audit interface. ``options`` go to
    :func:`~diffusion_xai.classifier.classify` (``schedule``, ``loss``, ``seed``, ...), except
    ``miss_timesteps`` (timesteps of the miss test, default 8) and ``from_prompt`` (default False): True
    judges every image with one template made from its own prompt, the value put before the prompt's last
    word ("a circle" -> "a {} circle"), instead of the attribute's templates (fewer, sharper candidates)."""

    name = "diffusion"

    def __init__(self, xp, **options):
        from ..classifier import DiffusionJudge

        if xp is None:
            raise ValueError("the diffusion judge needs a diffusion model (it judges with the model itself)")
        self.xp = xp
        self.miss_timesteps = int(options.pop("miss_timesteps", 8))
        self.from_prompt = bool(options.pop("from_prompt", False))
        self.seed = int(options.get("seed", 0))
        self.inner = DiffusionJudge(xp, **options)

    def __call__(self, images, prompts, attributes, miss_rate: bool = True) -> list[Verdict]:
        images = list(images)
        labels: list[dict] = [{} for _ in images]
        groups = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p if self.from_prompt else "", []).append(i)
        for p, idx in groups.items():
            for a, spec in attributes.items():
                templates = spec.templates
                if self.from_prompt:
                    words = p.split()
                    templates = [" ".join(words[:-1] + ["{}"] + words[-1:])]
                j = self.inner.judge([images[i] for i in idx], a, spec.values, templates=templates, progress=False)
                for i, v in zip(idx, j.labels):
                    labels[i][a] = v
        miss = prefers_empty(self.xp, images, prompts, self.miss_timesteps, self.seed) if miss_rate else \
            [None] * len(images)
        return [Verdict(lab, sorted(set(lab.values())), m) for lab, m in zip(labels, miss)]


# ------------------------------------------------------------------------------------------------ CLIP
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPJudge(Judge):
    """Zero-shot CLIP: every value becomes one prompt per template; a value's probability is the sum of
    the softmax (over all prompts, logits = logit_scale * cosine) of its prompts.

    Args:
        model: a transformers ``CLIPModel``.
        tokenizer: its tokenizer.
        image_size: side the images are resized to (default: the vision config's).
        mean, std: pixel normalisation (CLIP's by default).
    """

    name = "clip"

    def __init__(self, model, tokenizer, image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CLIPJudge:
        """Load a CLIP checkpoint folder (model + tokenizer; the image processor's mean/std when present)."""
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no CLIP checkpoint in {path} (expected config.json of a CLIPModel)")
        model = CLIPModel.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        mean, std, size = CLIP_MEAN, CLIP_STD, None
        if (path / "preprocessor_config.json").exists():
            import json

            cfg = json.loads((path / "preprocessor_config.json").read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            cs = cfg.get("crop_size")
            size = cs.get("height") if isinstance(cs, dict) else cs
        return cls(model, tok, size, mean, std)

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """(B, D) unit-norm image embeddings."""
        arr = np.stack([np.asarray(im.convert("RGB").resize((self.image_size, self.image_size)), np.float32)
                        for im in images]) / 255.0
        x = (torch.from_numpy(arr).permute(0, 3, 1, 2) - self.mean) / self.std
        f = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        f = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def probs(self, images, values: Sequence[str], templates: Sequence[str | Callable[[str], str]]) -> torch.Tensor:
        """(B, V) probability of every value."""
        texts, owner = [], []
        for j, v in enumerate(values):
            for t in templates:
                texts.append(t(v) if callable(t) else t.format(v))
                owner.append(j)
        logits = self.model.logit_scale.exp().float() * self.image_features(images) @ self.text_features(texts).T
        p = logits.softmax(-1).double()
        out = torch.zeros(p.shape[0], len(values), dtype=torch.float64)
        return out.index_add_(1, torch.tensor(owner), p)

    def __call__(self, images, prompts, attributes, miss_rate: bool = True) -> list[Verdict]:
        from ..classifier import default_templates

        images = list(images)
        labels: list[dict] = [{} for _ in images]
        for a, spec in attributes.items():
            p = self.probs(images, spec.values, spec.templates or default_templates(a))
            for i, k in enumerate(p.argmax(1).tolist()):
                labels[i][a] = spec.values[k]
        miss: list = [None] * len(images)
        if miss_rate:
            fi = self.image_features(images)
            ft = self.text_features(list(prompts) + [""])
            sim = fi @ ft.T
            miss = [bool(sim[i, -1] > sim[i, i]) for i in range(len(images))]
        return [Verdict(lab, sorted(set(lab.values())), m) for lab, m in zip(labels, miss)]


def make_judge(spec: AuditSpec, xp=None) -> Judge:
    """The judge a spec asks for (``xp``: the model, needed by the diffusion judge)."""
    if spec.judge == "oracle":
        if spec.judge_options:
            raise ValueError(f"the oracle judge takes no options, got {spec.judge_options}")
        return OracleJudge()
    if spec.judge == "diffusion":
        return ModelJudge(xp, **spec.judge_options)
    if spec.judge == "clip":
        return CLIPJudge.from_pretrained(spec.judge_checkpoint)
    raise ValueError(f"judge {spec.judge!r} does not exist; allowed: {', '.join(JUDGES)}")
