"""Zero-shot classification with a text-to-image diffusion model (Diffusion Classifier, Li et al. 2023).

The class whose prompt lets the model predict the noise of a noised image best is the answer:

    error_c = mean over samples (t, eps) of  mean_{C,H,W} loss(eps, eps_hat(x_t, t, prompt_c)),
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   x0 = VAE posterior mean x scaling factor,

without classifier-free guidance and without timestep weighting. Every class sees the SAME noise
``eps`` at the same ``(t, trial)``, so class differences are paired comparisons.

Two schedules decide which samples are evaluated:

* ``"reference"`` -- the published adaptive multi-stage evaluation. With ``M`` the largest stage,
  the timestep grid is ``range(T // M // 2, T, T // M)[:M]``; a stage with ``n`` samples takes
  ``grid[len // n // 2 :: len // n][:n]`` minus the timesteps already evaluated, scores the
  remaining classes with ``-mean error so far`` and keeps the top ``keep``. Defaults follow the paper:
  up to 10 classes ``(50, 5), (500, 1)`` (2,750 UNet evaluations for 10 classes), up to 50 classes
  ``(25, 5), (250, 1)``, more ``(20, 20), (50, 10), (100, 5), (500, 1)``.
* ``"fast"`` (default) -- paired-difference sequential elimination on the same grid and noise. Timesteps
  are visited in a stratified (bit-reversed) order, a batch of new timesteps at a time for all classes
  still in the race; after each round every class whose paired difference to the leader,
  ``mean(err_c - err_leader)``, is positive beyond ``z`` standard errors is dropped. It stops when one
  class is left, the grid is used up or it has spent the reference schedule's UNet evaluations, and
  answers with the lowest mean error on the shared samples.

Probabilities are ``softmax(-delta / temperature)`` where ``delta_c`` is the paired mean error
difference between class ``c`` and the predicted class (on the samples ``c`` was evaluated on).
``temperature`` is fitted (:func:`fit_temperature`) on held-out data and stored next to the model as
``classifier_calibration.json`` (see :func:`save_calibration`); without a stored calibration the
temperature is 1 and ``result.calibrated`` is False (the raw, nearly flat softmax of the errors).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .calibration import load_entry, save_entry
from .results import load_result, save_result

SCHEDULES = ("fast", "reference")
LOSSES = ("l2", "l1", "huber")
CALIBRATION_FILE = "classifier_calibration.json"


# ----------------------------------------------------------------------------------------- schedules
def reference_stages(num_classes: int) -> tuple[tuple[int, int], ...]:
    """The paper's ``(timesteps, keep)`` stages for a number of classes."""
    if num_classes <= 10:
        return ((50, 5), (500, 1))
    if num_classes <= 50:
        return ((25, 5), (250, 1))
    return ((20, 20), (50, 10), (100, 5), (500, 1))


def timestep_grid(num_train_timesteps: int, max_samples: int) -> list[int]:
    """The reference grid: ``range(T // M // 2, T, T // M)[:M]`` (trained timestep indices)."""
    T, M = int(num_train_timesteps), int(max_samples)
    if not 1 <= M <= T:
        raise ValueError(f"the largest stage must have 1..{T} timesteps (T = {T}), got {M}")
    return list(range(T // M // 2, T, T // M))[:M]


def stage_indices(grid_len: int, n: int, evaluated: set[int] | Sequence[int] = ()) -> list[int]:
    """Grid positions a reference stage with ``n`` samples evaluates: ``[len//n//2 :: len//n][:n]``
    of ``range(grid_len)``, minus the positions already ``evaluated``."""
    step = grid_len // n
    done = set(evaluated)
    return [m for m in list(range(grid_len))[step // 2::step][:n] if m not in done]


def reference_evals(num_classes: int, stages: Sequence[tuple[int, int]] | None = None, trials: int = 1) -> int:
    """UNet evaluations per image of the reference schedule (e.g. 2,750 for 10 classes)."""
    stages = _check_stages(stages or reference_stages(num_classes))
    M = max(n for n, _ in stages)
    active, done, total = num_classes, set(), 0
    for n, keep in stages:
        new = stage_indices(M, n, done)
        done.update(new)
        total += active * len(new) * trials
        active = min(keep, active)
    return total


def stratified_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed (van der Corput) order: every prefix is spread evenly over the range."""
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    rev = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(2 ** bits)]
    return [r for r in rev if r < n]


def _check_stages(stages) -> tuple[tuple[int, int], ...]:
    try:
        stages = tuple((int(n), int(k)) for n, k in stages)
    except (TypeError, ValueError):
        raise ValueError(f"stages must be (timesteps, keep) pairs, e.g. ((50, 5), (500, 1)); got {stages!r}") from None
    if not stages:
        raise ValueError("stages must hold at least one (timesteps, keep) pair")
    for n, k in stages:
        if n < 1 or k < 1:
            raise ValueError(f"stage ({n}, {k}) is not allowed: timesteps and keep must be >= 1")
    return stages


# ----------------------------------------------------------------------------------------- losses / calibration
def sample_loss(eps: torch.Tensor, eps_hat: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Per-sample error, mean over C, H, W: (N, C, H, W) x 2 -> (N,) float32."""
    eps, eps_hat = eps.float(), eps_hat.float()
    if loss == "l2":
        e = (eps - eps_hat) ** 2
    elif loss == "l1":
        e = (eps - eps_hat).abs()
    elif loss == "huber":
        e = F.huber_loss(eps_hat, eps, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    return e.flatten(1).mean(1)


def softmax_probs(deltas: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(-deltas / temperature)`` over the last dim (float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(-deltas.double() / temperature, dim=-1)


def fit_temperature(deltas: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Temperature minimising the negative log-likelihood of ``labels`` under ``softmax(-deltas / T)``.

    Args:
        deltas: (N, K) paired mean error differences to the predicted class (``result.deltas``).
        labels: (N,) true class indices.
    The NLL is convex in ``1 / T``; it is minimised by golden-section search on ``log(1 / T)``.
    """
    d = torch.as_tensor(deltas, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    if d.ndim != 2 or d.shape[0] != y.shape[0] or d.shape[0] == 0:
        raise ValueError(f"deltas must be (N, K) with one label each, got {tuple(d.shape)} and {tuple(y.shape)}")

    def nll(log_beta: float) -> float:
        return float(-torch.log_softmax(-d * math.exp(log_beta), -1)[torch.arange(len(y)), y].mean())

    pos = d[(d > 0) & d.isfinite()]  # +inf marks a padded (impossible) class
    scale = float(pos.median()) if len(pos) else 1.0
    lo, hi = math.log(1e-3 / scale), math.log(1e4 / scale)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp(-(lo + hi) / 2))


def expected_calibration_error(probs: torch.Tensor, labels: Sequence[int] | torch.Tensor, bins: int = 10) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| x bin share."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    conf, pred = p.max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for i in range(bins):
        inside = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        if inside.any():
            ece += float(inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs())
    return ece


def save_calibration(folder: str | Path, loss: str, temperature: float, **info) -> Path:
    """Store a fitted temperature for ``loss`` in ``folder/classifier_calibration.json`` (other losses kept)."""
    return save_entry(folder, CALIBRATION_FILE, loss, temperature=float(temperature), **info)


def load_calibration(xp, loss: str = "l2") -> float | None:
    """The stored temperature of the model's folder for ``loss``, or None when there is none."""
    entry = load_entry(xp, CALIBRATION_FILE, loss)
    return None if entry is None else float(entry["temperature"])


# ----------------------------------------------------------------------------------------- result
def _nan_to_none(a) -> list:
    return [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in np.asarray(a).tolist()]


@dataclass
class ClassificationResult:
    """Zero-shot classification of a batch of images.

    Attributes:
        sample_errors: (B, K, M, trials) float64 error of every evaluated sample (image, class,
            grid position, trial); NaN where the schedule did not evaluate it.
        grid: (M,) trained timestep of every grid position.
        noise: (M, trials, C, h, w) float32 noise of every (timestep, trial); shared by all classes
            and all images.
        classes: the class labels; ``prompts``: the prompts they became (``template`` filled in).
        temperature: softmax temperature of :attr:`probs`; ``calibrated``: whether it was fitted.
        schedule, loss, seed, trials, stages (reference) / options (fast): how it was run.
        unet_evals: (B,) UNet evaluations per image; ``seconds``: (B,) wall time per image.
    """

    sample_errors: torch.Tensor
    grid: torch.Tensor
    noise: torch.Tensor = field(repr=False)
    classes: list[str]
    prompts: list[str]
    template: str | None = None
    temperature: float = 1.0
    calibrated: bool = False
    schedule: str = "fast"
    loss: str = "l2"
    seed: int = 0
    trials: int = 1
    stages: list[list[int]] | None = None
    options: dict = field(default_factory=dict)
    unet_evals: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    # -------------------------------------------------------------- statistics
    def __len__(self) -> int:
        return self.sample_errors.shape[0]

    @property
    def _flat(self) -> torch.Tensor:
        return self.sample_errors.flatten(2)  # (B, K, M * trials)

    @property
    def n_samples(self) -> torch.Tensor:
        """(B, K) number of evaluated (timestep, trial) samples per class."""
        return (~self._flat.isnan()).sum(-1)

    @property
    def errors(self) -> torch.Tensor:
        """(B, K) mean error of every class over its evaluated samples (the reference score is minus this)."""
        return self._flat.nanmean(-1)

    @property
    def stderr(self) -> torch.Tensor:
        """(B, K) standard error of :attr:`errors` (NaN with one sample)."""
        e = self._flat
        n = self.n_samples.double()
        var = ((e - e.nanmean(-1, keepdim=True)) ** 2).nansum(-1) / (n - 1)
        return (var / n).sqrt()

    @property
    def predictions(self) -> torch.Tensor:
        """(B,) index of the predicted class: the one evaluated on the most samples (the last survivor),
        ties broken by the lowest mean error on the shared samples."""
        n = self.n_samples
        flat = self._flat
        out = []
        for i in range(len(self)):
            cands = (n[i] == n[i].max()).nonzero().flatten()
            e = flat[i, cands]
            shared = ~e.isnan().any(0)  # samples every candidate was evaluated on
            e = e[:, shared] if shared.any() else e
            out.append(int(cands[e.nanmean(-1).argmin()]))
        return torch.tensor(out, dtype=torch.long)

    @property
    def labels(self) -> list[str]:
        """The predicted class label of every image."""
        return [self.classes[int(i)] for i in self.predictions]

    @property
    def deltas(self) -> torch.Tensor:
        """(B, K) paired mean error difference ``mean(err_c - err_pred)`` on the samples of class c (>= 0
        for well separated classes; 0 for the prediction)."""
        pred = self.predictions
        flat = self._flat
        best = flat[torch.arange(len(self)), pred][:, None]
        return (flat - best).nanmean(-1)

    @property
    def delta_stderr(self) -> torch.Tensor:
        """(B, K) standard error of :attr:`deltas` (paired; 0 for the prediction)."""
        pred = self.predictions
        d = self._flat - self._flat[torch.arange(len(self)), pred][:, None]
        n = (~d.isnan()).sum(-1).double()
        var = ((d - d.nanmean(-1, keepdim=True)) ** 2).nansum(-1) / (n - 1)
        return torch.where(n > 1, (var / n).sqrt(), float("nan"))

    @property
    def probs(self) -> torch.Tensor:
        """(B, K) probabilities ``softmax(-deltas / temperature)``."""
        return softmax_probs(self.deltas, self.temperature)

    def topk(self, k: int = 5, image: int | None = None) -> list[list[tuple[str, float]]] | list[tuple[str, float]]:
        """The k most probable (label, probability) pairs, per image (or of one image)."""
        p = self.probs
        k = min(k, p.shape[1])
        vals, idx = p.topk(k, dim=-1)
        rows = [[(self.classes[int(j)], float(v)) for v, j in zip(vals[i], idx[i])] for i in range(len(self))]
        return rows if image is None else rows[image]

    def timesteps(self, image: int = 0) -> list[int]:
        """Trained timesteps at which any class of ``image`` was evaluated (ascending)."""
        used = (~self.sample_errors[image].isnan()).any(0).any(-1)
        return self.grid[used].tolist()

    def with_temperature(self, temperature: float, calibrated: bool = True) -> ClassificationResult:
        """A copy whose probabilities use another temperature."""
        softmax_probs(torch.zeros(1), temperature)  # validates
        return dataclasses.replace(self, temperature=float(temperature), calibrated=calibrated)

    def accuracy(self, labels: Sequence[str | int]) -> float:
        """Share of images whose prediction equals the true label (class label or index)."""
        y = [self.classes.index(v) if isinstance(v, str) else int(v) for v in labels]
        if len(y) != len(self):
            raise ValueError(f"got {len(y)} labels for {len(self)} images")
        return float((self.predictions == torch.tensor(y)).double().mean())

    # -------------------------------------------------------------- output
    def image_dict(self, i: int) -> dict:
        """JSON-safe summary of image ``i``."""
        return {"prediction": self.labels[i], "prediction_index": int(self.predictions[i]),
                "top": [{"class": c, "prob": p} for c, p in self.topk(5, i)],
                "probs": dict(zip(self.classes, self.probs[i].tolist())),
                "errors": _nan_to_none(self.errors[i]), "stderr": _nan_to_none(self.stderr[i]),
                "deltas": _nan_to_none(self.deltas[i]), "delta_stderr": _nan_to_none(self.delta_stderr[i]),
                "n_samples": self.n_samples[i].tolist(), "timesteps": self.timesteps(i),
                "unet_evals": int(self.unet_evals[i]) if self.unet_evals else None,
                "seconds": float(self.seconds[i]) if self.seconds else None}

    def to_dict(self) -> dict:
        """JSON-safe metadata and per-image summaries (no raw tensors)."""
        return {"classes": self.classes, "prompts": self.prompts, "template": self.template,
                "schedule": self.schedule, "loss": self.loss, "seed": self.seed, "trials": self.trials,
                "stages": self.stages, "options": self.options, "temperature": self.temperature,
                "calibrated": self.calibrated, "grid": self.grid.tolist(),
                "unet_evals": [int(v) for v in self.unet_evals], "seconds": [float(v) for v in self.seconds],
                "images": [self.image_dict(i) for i in range(len(self))]}

    def save(self, folder: str | Path, noise: bool = True) -> Path:
        """Write the raw errors, grid and (optionally) the noise as safetensors and metadata as JSON."""
        tensors = {"sample_errors": self.sample_errors, "grid": self.grid}
        if noise:
            tensors["noise"] = self.noise
        meta = self.to_dict()
        meta.pop("images")
        meta.pop("grid")
        return save_result(folder, tensors, meta, kind="classification")

    @classmethod
    def load(cls, folder: str | Path) -> ClassificationResult:
        tensors, m = load_result(folder, "classification")
        noise = tensors.get("noise", torch.empty(0))
        return cls(tensors["sample_errors"], tensors["grid"], noise, m["classes"], m["prompts"], m["template"],
                   m["temperature"], m["calibrated"], m["schedule"], m["loss"], m["seed"], m["trials"],
                   m["stages"], m["options"], m["unet_evals"], m["seconds"])

    def plot(self, image: int = 0, k: int = 10, image_pil=None):
        """Bar chart of the top-k probabilities with the paired error differences (+- 1 s.e.) beside them;
        the image itself on the left when given."""
        import matplotlib.pyplot as plt

        p = self.probs[image]
        k = min(k, len(self.classes))
        order = p.argsort(descending=True)[:k].tolist()
        ncols = 3 if image_pil is not None else 2
        fig, axes = plt.subplots(1, ncols, figsize=(3.2 * ncols + 1, 0.35 * k + 1.5), squeeze=False)
        axes = list(axes[0])
        if image_pil is not None:
            ax = axes.pop(0)
            ax.imshow(image_pil)
            ax.axis("off")
        names = [self.classes[j] for j in order][::-1]
        axes[0].barh(names, [float(p[j]) for j in order][::-1], color="tab:blue")
        axes[0].set_xlabel("probability" + ("" if self.calibrated else " (uncalibrated)"))
        d, s = self.deltas[image], self.delta_stderr[image].nan_to_num(0.0)
        axes[1].barh(names, [float(d[j]) for j in order][::-1], xerr=[float(s[j]) for j in order][::-1],
                     color="tab:orange")
        axes[1].set_xlabel(f"{self.loss} error - best (paired)")
        axes[1].set_yticks([])
        fig.suptitle(f"{self.labels[image]}  ({self.schedule}, {self.unet_evals[image] if self.unet_evals else '?'}"
                     " UNet evals)", fontsize=10)
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------------------- the classifier
def check_classes(xp, classes: Sequence[str], template: str | None = None) -> list[str]:
    """Validate class labels and return their prompts; clear errors for every bad input."""
    if isinstance(classes, str):
        raise ValueError(f"classes must be a list of strings, got the single string {classes!r} "
                         "(split it, e.g. classes.split(','))")
    classes = list(classes)
    if not classes:
        raise ValueError("give at least two classes; got an empty class list")
    for c in classes:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"classes must be non-empty strings, got {c!r}")
    if len(classes) < 2:
        raise ValueError(f"give at least two classes to choose between; got only {classes[0]!r}")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ValueError(f"duplicate classes: {', '.join(map(repr, dup))}; every class must be distinct")
    if template is not None:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"template must be a string with one '{{}}' for the class, got {template!r}")
        prompts = [template.format(c) for c in classes]
    else:
        prompts = classes
    for tok in xp.tokenizers:
        limit = int(tok.model_max_length)
        for p in prompts:
            n = len(tok(p, truncation=False).input_ids)
            if n > limit:
                raise ValueError(f"class prompt {p!r} is {n} tokens long; the text encoder takes at most {limit} "
                                 "(including start and end tokens): shorten it")
    return prompts


class _Evaluator:
    """Computes errors of (class, grid position, trial) rows of one image through ``xp.predict_noise``."""

    def __init__(self, xp, emb, noise: torch.Tensor, grid: torch.Tensor, loss: str, chunk: int):
        self.xp, self.emb, self.noise, self.grid, self.loss, self.chunk = xp, emb, noise, grid, loss, chunk

    def __call__(self, x0: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor, trial: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(cls), self.chunk):
            c, m, r = cls[i:i + self.chunk], pos[i:i + self.chunk], trial[i:i + self.chunk]
            eps = self.noise[m, r]
            t = self.grid[m]
            x_t = self.xp.add_noise(x0.expand(len(c), -1, -1, -1), eps, t)
            eps_hat = self.xp.predict_noise(x_t, t, self.emb.index(c))
            out.append(sample_loss(eps, eps_hat, self.loss).double().cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def _rows(active: Sequence[int], positions: Sequence[int], trials: int) -> tuple[torch.Tensor, ...]:
    c, m, r = torch.meshgrid(torch.as_tensor(list(active)), torch.as_tensor(list(positions)),
                             torch.arange(trials), indexing="ij")
    return c.flatten(), m.flatten(), r.flatten()


def _run_reference(ev: _Evaluator, x0, K: int, M: int, trials: int, stages, errs: torch.Tensor) -> None:
    active, done = list(range(K)), []
    for n, keep in stages:
        new = stage_indices(M, n, done)
        if new:
            c, m, r = _rows(active, new, trials)
            errs[c, m, r] = ev(x0, c, m, r)
            done += new
        scores = -errs[active][:, done].flatten(1).mean(-1)
        order = np.argsort(-scores.numpy(), kind="stable")[:min(keep, len(active))]
        active = [active[int(i)] for i in order]


def _run_fast(ev: _Evaluator, x0, K: int, M: int, trials: int, errs: torch.Tensor, z: float, min_timesteps: int,
              round_rows: int, max_timesteps: int, max_evals: int | None = None) -> None:
    order = stratified_order(M)[:max_timesteps]
    active, done, pos, spent = list(range(K)), [], 0, 0
    budget = max_evals if max_evals is not None else K * M * trials
    while len(active) > 1 and pos < len(order):
        k = max(1, math.ceil(round_rows / (len(active) * trials)))
        if not done:
            k = max(k, min_timesteps)
        k = min(k, (budget - spent) // (len(active) * trials))
        if k < 1:
            break
        new = order[pos:pos + k]
        pos += len(new)
        c, m, r = _rows(active, new, trials)
        errs[c, m, r] = ev(x0, c, m, r)
        spent += len(c)
        done += new
        if len(done) < min_timesteps:
            continue
        e = errs[active][:, done].flatten(1)  # (A, n): every active class has every sample
        leader = int(e.mean(-1).argmin())
        d = e - e[leader]
        se = d.std(-1) / math.sqrt(d.shape[1])
        worse = d.mean(-1) - z * se > 0
        active = [a for a, w in zip(active, worse.tolist()) if not w]


def classify(xp, images, classes: Sequence[str], template: str | None = None, schedule: str = "fast",
             loss: str = "l2", seed: int = 0, trials: int = 1, stages: Sequence[tuple[int, int]] | None = None,
             confidence: float = 0.99, min_timesteps: int = 8, max_timesteps: int | None = None,
             round_rows: int | None = None, max_evals: int | None = None, temperature: float | None = None,
             progress: bool = True, noise: torch.Tensor | None = None) -> ClassificationResult:
    """Zero-shot classification of images by the diffusion model's noise-prediction error.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline` (SD 1.x / 2.x incl. v-prediction / SDXL).
        images: a PIL RGB image, uint8 (H, W, 3) array, a list of them, or a (B, 3, H, W) tensor in [-1, 1].
        classes: class labels (with ``template``) or full prompts; at least two, all distinct.
        template: e.g. ``"a photo of a {}"``; None uses the classes as prompts.
        schedule: ``"fast"`` (paired sequential elimination) or ``"reference"`` (the paper's stages).
        loss: ``"l2"`` (default), ``"l1"`` or ``"huber"`` (delta 1), mean over C, H, W.
        seed: seeds the noise, which is the same for every image and every class.
        trials: noises per timestep.
        stages: reference ``(timesteps, keep)`` stages (default :func:`reference_stages`); the largest
            stage sets the grid for both schedules.
        confidence: fast: a class is dropped when it is worse than the leader at this confidence
            (one-sided normal bound on the paired mean difference, Bonferroni over the other classes).
        min_timesteps: fast: timesteps evaluated before the first elimination.
        max_timesteps: fast: most grid timesteps evaluated per image (default: the whole grid).
        round_rows: fast: UNet rows per round (default: ``xp.batch_size``; more = fewer, larger calls).
        max_evals: fast: most UNet evaluations per image (default: the reference schedule's cost, so
            ``fast`` never costs more); when it runs out the lowest mean error on shared samples wins.
        temperature: softmax temperature; None uses the calibration stored with the model, else 1.
        noise: (M, trials, C, h, w) noise to use instead of the seeded draw.
    Returns:
        :class:`ClassificationResult`.
    """
    from .pipeline import validate_seed

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    seed = validate_seed(seed)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if min_timesteps < 2:
        raise ValueError(f"min_timesteps must be >= 2 (a standard error needs two samples), got {min_timesteps}")
    prompts = check_classes(xp, classes, template)
    K = len(prompts)
    stages = _check_stages(stages or reference_stages(K))
    M = max(n for n, _ in stages)
    grid = torch.tensor(timestep_grid(xp.num_train_timesteps, M), dtype=torch.long)
    M = len(grid)
    if max_timesteps is not None and not 2 <= max_timesteps <= M:
        raise ValueError(f"max_timesteps must be in [2, {M}] (the grid size), got {max_timesteps}")

    if max_evals is None:
        max_evals = reference_evals(K, stages, trials)
    elif max_evals < 2 * K * trials:
        raise ValueError(f"max_evals must be >= {2 * K * trials} (two timesteps for each of {K} classes), "
                         f"got {max_evals}")

    # images: validate all before any UNet work
    x = xp._images_to_tensor(images)
    f = xp.vae_scale_factor
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image size {x.shape[-1]}x{x.shape[-2]} is not allowed; width and height must be "
                         f"multiples of {f}")
    B = x.shape[0]
    lat_shape = (xp.unet.config.in_channels, x.shape[-2] // f, x.shape[-1] // f)
    if noise is None:
        g = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((M, trials, *lat_shape), generator=g)
    elif tuple(noise.shape) != (M, trials, *lat_shape):
        raise ValueError(f"noise must have shape {(M, trials, *lat_shape)} (grid, trials, latent), "
                         f"got {tuple(noise.shape)}")
    noise = noise.float()
    if temperature is None:
        temperature, calibrated = load_calibration(xp, loss), True
        if temperature is None:
            temperature, calibrated = 1.0, False
    else:
        softmax_probs(torch.zeros(1), temperature)
        calibrated = True

    emb = xp.encode_prompt(prompts)  # once, cached by the wrapper
    rr = int(round_rows or xp.batch_size)
    ev = _Evaluator(xp, emb, noise.to(xp.device), grid, loss, chunk=max(xp.batch_size, rr) * 4)
    z = _normal_ppf(1 - (1 - confidence) / max(K - 1, 1))
    errs = torch.full((B, K, M, trials), float("nan"), dtype=torch.float64)
    evals, secs = [], []
    from tqdm.auto import tqdm

    bar = tqdm(range(B), desc=f"classify ({schedule})", disable=not progress or B == 0, leave=False)
    for i in bar:
        t0, e0 = time.perf_counter(), xp.unet_evals
        x0 = xp.encode_image(x[i:i + 1])
        if schedule == "reference":
            _run_reference(ev, x0, K, M, trials, stages, errs[i])
        else:
            _run_fast(ev, x0, K, M, trials, errs[i], z, min_timesteps, rr, max_timesteps or M, max_evals)
        evals.append(xp.unet_evals - e0)
        secs.append(time.perf_counter() - t0)
        bar.set_postfix(evals=evals[-1])
    options = {} if schedule == "reference" else {
        "confidence": confidence, "z": z, "min_timesteps": min_timesteps, "round_rows": rr,
        "max_timesteps": max_timesteps or M, "max_evals": max_evals}
    return ClassificationResult(errs, grid, noise.cpu(), list(classes), prompts, template, float(temperature),
                                calibrated, schedule, loss, seed, trials, [list(s) for s in stages], options,
                                evals, secs)


def _normal_ppf(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; plenty for confidence bounds)."""
    lo, hi = -12.0, 12.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------- judge for audits
def default_templates(attribute: str) -> list[str | Callable[[str], str]]:
    """Prompts of a ShapesWorld attribute value, marginalised over the other attributes it needs."""
    from .shapesworld import SHAPES

    if attribute in ("color", "size"):
        return [f"a {{}} {s}" for s in SHAPES]
    if attribute == "shape":
        return ["a {}"]
    if attribute == "position":
        return [(lambda v, s=s: f"a {s} {'in' if v == 'center' else 'on'} the {v}") for s in SHAPES]
    return ["{}"]


@dataclass
class Judgement:
    """Which value of an attribute each image shows.

    Attributes:
        attribute / values: what was judged, among which values.
        labels: the judged value of every image.
        probs: (B, V) probability of each value (the sum over its prompts).
        classification: the underlying :class:`ClassificationResult` over all (value, template) prompts.
    """

    attribute: str
    values: list[str]
    labels: list[str]
    probs: torch.Tensor
    classification: ClassificationResult = field(repr=False)

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "values": self.values, "labels": self.labels,
                "probs": self.probs.tolist(), "unet_evals": self.classification.unet_evals}


class DiffusionJudge:
    """The classifier as a judge for audits: ``DiffusionJudge(xp).judge(images, "color", ["red", "blue"])``.

    Every value becomes one prompt per template (defaults: :func:`default_templates`, the ShapesWorld
    grammar); the images are classified among all these prompts and a value's probability is the sum
    over its prompts. Keyword arguments go to :func:`classify` (``schedule``, ``loss``, ``seed``, ...).
    """

    def __init__(self, xp, **classify_kwargs):
        self.xp = xp
        self.kwargs = classify_kwargs

    def judge(self, images, attribute: str, values: Sequence[str],
              templates: Sequence[str | Callable[[str], str]] | None = None, progress: bool = True) -> Judgement:
        values = list(values)
        if len(values) < 2 or len(set(values)) != len(values):
            raise ValueError(f"values must hold at least two distinct values, got {values!r}")
        templates = list(templates) if templates is not None else default_templates(attribute)
        prompts, owner = [], []
        for j, v in enumerate(values):
            for tpl in templates:
                p = tpl(v) if callable(tpl) else tpl.format(v)
                if p not in prompts:
                    prompts.append(p)
                    owner.append(j)
        res = classify(self.xp, images, prompts, progress=progress, **self.kwargs)
        P = res.probs
        probs = torch.zeros(P.shape[0], len(values), dtype=torch.float64)
        probs.index_add_(1, torch.tensor(owner), P)
        labels = [values[owner[int(i)]] for i in res.predictions]
        return Judgement(attribute, values, labels, probs, res)
