"""End-to-end report: every explanation of one prompt in one self-contained HTML page.

:func:`build_report` generates the prompt's image once and runs, on that same image:

1. **word heatmaps** (DAAM, :meth:`XAIPipeline.heatmaps`): one overlay per content word;
2. a **PID panel** for two words (:meth:`XAIPipeline.pid`): the six maps and the bar chart of the
   image-level terms;
3. the **classifier's reading** (:meth:`XAIPipeline.classify`): probabilities over a few candidate
   captions (by default the prompt with its colour word, then its shape word, swapped for others);
4. an **inconsistency check** (:meth:`XAIPipeline.localize_inconsistency`) of the image against a
   contradicting caption (by default the prompt with its first colour swapped).

The page embeds every picture as a base64 PNG, so ``report.html`` is one file that can be mailed;
``report.json`` holds the numbers (every method's ``to_dict()``, timings, UNet evaluations).

The defaults are the *report's*, chosen to finish in well under a minute on the embedded ShapesWorld
model on one CPU thread (8-10 s measured on the interim checkpoint, 1,096 UNet evaluations); the two costly ones are cheaper
than the methods' own (paper) defaults, so those numbers are somewhat noisier. The page and the JSON
say which settings were used:

=====================  ===========  =====================================================
setting                report       method default
=====================  ===========  =====================================================
``num_samples`` (PID)  64           100 (``information.DEFAULT_NUM_SAMPLES``)
``align_steps``        30           50 (``inconsistency.DEFAULT_ALIGN_STEPS``)
``num_mask_seeds``     10           10
``word_samples``       16           16
``classify_max_evals`` None         None = the reference schedule's cost (the fast schedule
                                    usually stops earlier)
=====================  ===========  =====================================================
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .tokens import split_words, validate_prompt

REPORT_PID_SAMPLES = 64
REPORT_ALIGN_STEPS = 30
REPORT_MASK_SEEDS = 10
REPORT_WORD_SAMPLES = 16
REPORT_NUM_CANDIDATES = 4
SECTIONS = ("image", "heatmaps", "pid", "classification", "inconsistency")

FUNCTION_WORDS = frozenset({"a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "is", "are"})


def _vocab():
    from .shapesworld import COLORS, SHAPES

    return list(COLORS), list(SHAPES)


def content_words(prompt: str) -> list[str]:
    """The prompt's alphanumeric words that are not function words, in order (repeats kept once)."""
    return list(dict.fromkeys(w for w in split_words(prompt) if w.isalnum() and w not in FUNCTION_WORDS))


def default_pair(prompt: str) -> tuple[str, str]:
    """Two words of the prompt for the PID panel: its first colour word and the shape word after it
    (ShapesWorld vocabulary), else its first two content words."""
    colors, shapes = _vocab()
    words = split_words(prompt)
    for i, w in enumerate(words):
        if w in colors:
            for v in words[i + 1:]:
                if v in shapes:
                    return w, v
    cw = content_words(prompt)
    if len(cw) < 2:
        raise ValueError(f"prompt {prompt!r} has fewer than two content words ({', '.join(cw) or 'none'}); "
                         "give the PID pair explicitly, e.g. --pair red,circle")
    return cw[0], cw[1]


def _swap(prompt: str, vocab: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` prompts with the first word of ``vocab`` in the prompt replaced by other entries."""
    words = split_words(prompt)
    hit = next((i for i, w in enumerate(words) if w in vocab), None)
    if hit is None:
        return []
    others = [v for v in vocab if v != words[hit]][:k]
    return [" ".join(words[:hit] + [v] + words[hit + 1:]) for v in others]


def default_contradiction(prompt: str) -> str:
    """The prompt with its first colour word swapped for another colour (else its first shape word
    for another shape): a caption that contradicts the image generated from the prompt."""
    colors, shapes = _vocab()
    for vocab in (colors, shapes):
        alt = _swap(prompt, vocab, 1)
        if alt:
            return alt[0]
    raise ValueError(f"no colour ({', '.join(colors)}) or shape ({', '.join(shapes)}) word in prompt {prompt!r} "
                     "to contradict; give the contradicting caption explicitly (--contradict)")


def default_candidates(prompt: str, k: int = REPORT_NUM_CANDIDATES) -> list[str]:
    """Candidate captions for the classifier: the prompt first, then the prompt with its colour word
    swapped, then with its shape word swapped, ``k`` in all (at least 2)."""
    colors, shapes = _vocab()
    words = " ".join(split_words(prompt))
    out = [words]
    for alt in _swap(prompt, colors, k) + _swap(prompt, shapes, k):
        if alt not in out and len(out) < k:
            out.append(alt)
    if len(out) < 2:
        raise ValueError(f"no colour or shape word in prompt {prompt!r} to build candidate captions from; "
                         "give the candidates explicitly (--classes)")
    return out


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_b64(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return (f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}"{w} '
            f'style="image-rendering:pixelated">')


@dataclass
class Report:
    """What :func:`build_report` made.

    Attributes:
        html_path / json_path: the written files.
        data: the JSON content (prompt, settings, every section's numbers, timings, UNet evaluations).
        image: the generated image (PIL).
        results: the method results by section name (``heatmaps``, ``pid``, ``classification``,
            ``inconsistency``).
    """

    html_path: Path
    json_path: Path
    data: dict
    image: Image.Image = field(repr=False)
    results: dict = field(default_factory=dict, repr=False)


def build_report(xp, prompt: str, word_pair: Sequence[str] | None = None, contradicting_caption: str | None = None,
                 out_dir: str | Path = "out/report", seed: int = 0, classes: Sequence[str] | None = None,
                 num_samples: int = REPORT_PID_SAMPLES, align_steps: int = REPORT_ALIGN_STEPS,
                 num_mask_seeds: int = REPORT_MASK_SEEDS, word_samples: int = REPORT_WORD_SAMPLES,
                 classify_max_evals: int | None = None, num_inference_steps: int | None = None,
                 progress: bool = True, callback: Callable[[int, int, str], None] | None = None) -> Report:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.json`` for one prompt.

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline`.
        prompt: the prompt; its image is generated once (``seed``) and every section analyses it.
        word_pair: two words of the prompt for the PID panel (default :func:`default_pair`).
        contradicting_caption: a caption that disagrees with the image (default
            :func:`default_contradiction`: the prompt with its colour swapped).
        out_dir: output folder (created).
        seed: seeds generation and every method.
        classes: candidate captions for the classifier (default :func:`default_candidates`).
        num_samples: PID (logSNR, noise) samples (4 x this many UNet evaluations).
        align_steps, num_mask_seeds, word_samples: inconsistency settings (see the module docstring).
        classify_max_evals: UNet evaluation budget of the classifier (default: the classifier's own).
        num_inference_steps: generation steps (default: the model's).
        progress: print one line per section to stderr (and the methods' tqdm bars).
        callback: called as ``callback(done, total, section)`` before each section and once at the end
            (``done == total``); the Gradio app drives its progress bar with it.
    Returns:
        :class:`Report`.
    Raises:
        ValueError: a bad prompt, pair, caption or class list, before any compute.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    prompt = validate_prompt(prompt)
    if word_pair is None:
        word_pair = default_pair(prompt)
    elif isinstance(word_pair, str) or len(word_pair) != 2:
        raise ValueError(f"word_pair must be two words, e.g. ('red', 'circle'), got {word_pair!r}")
    w1, w2 = word_pair
    present = split_words(prompt)
    for w in (w1, w2):
        if not isinstance(w, str) or w.lower() not in present:
            raise ValueError(f"word {w!r} is not in prompt {prompt!r}; words: {', '.join(present)}")
    if w1.lower() == w2.lower():
        raise ValueError(f"the PID pair needs two different words, got {w1!r} twice")
    contra = default_contradiction(prompt) if contradicting_caption is None else validate_prompt(contradicting_caption)
    cands = default_candidates(prompt) if classes is None else list(classes)
    from .classifier import check_classes

    check_classes(xp, cands)
    budget = classify_max_evals
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    total = 4
    timings: dict[str, float] = {}
    evals: dict[str, int] = {}
    results: dict = {}

    def step(i: int, name: str) -> None:
        if callback is not None:
            callback(i, total, name)
        if progress:
            print(f"[report {i + 1}/{total}] {name} ...", file=sys.stderr, flush=True)

    def timed(name: str, fn):
        t0, e0 = time.perf_counter(), xp.unet_evals
        r = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        evals[name] = xp.unet_evals - e0
        if progress:
            print(f"           {name}: {timings[name]:.1f} s, {evals[name]} UNet evaluations",
                  file=sys.stderr, flush=True)
        return r

    step(0, "generate + heatmaps")
    hm = timed("heatmaps", lambda: xp.heatmaps(prompt, seed=seed, num_inference_steps=num_inference_steps,
                                                 progress=progress))
    image = hm.images[0]
    results["heatmaps"] = hm
    step(1, f"PID of {w1!r}, {w2!r}")
    pid = timed("pid", lambda: xp.pid(image, w1, w2, prompt=prompt, num_samples=num_samples, seed=seed,
                                      progress=progress))
    results["pid"] = pid
    step(2, "classification")
    cls = timed("classification", lambda: xp.classify(image, cands, seed=seed, max_evals=budget, progress=progress))
    results["classification"] = cls
    step(3, "inconsistency")
    inc = timed("inconsistency", lambda: xp.localize_inconsistency(
        image, contra, align_steps=align_steps, num_mask_seeds=num_mask_seeds, word_samples=word_samples,
        num_inference_steps=num_inference_steps, seed=seed, progress=progress))
    results["inconsistency"] = inc
    if callback is not None:
        callback(total, total, "done")

    hm_meta = hm.to_dict()
    hm_meta.pop("tokens", None)
    words = content_words(prompt)
    settings = {"seed": seed, "num_inference_steps": hm.num_inference_steps, "guidance_scale": hm.guidance_scale,
                "pid_samples": num_samples, "align_steps": align_steps, "mask_seeds": num_mask_seeds,
                "word_samples": word_samples, "classify_max_evals": budget}
    data = {"prompt": prompt, "word_pair": [w1, w2], "contradicting_caption": contra, "candidates": cands,
            "settings": settings, "heatmap_words": words, "heatmaps": hm_meta, "pid": pid.to_dict(),
            "classification": cls.image_dict(0) | {"calibrated": cls.calibrated, "classes": cls.classes},
            "inconsistency": inc.to_dict(), "seconds": timings, "unet_evals": evals,
            "total_seconds": round(sum(timings.values()), 3), "sections": list(SECTIONS)}
    page = _render(data, image, hm, words, pid, cls, inc)
    html_path, json_path = out / "report.html", out / "report.json"
    html_path.write_text(page, encoding="utf-8")
    json_path.write_text(json.dumps(data, indent=2))
    if progress:
        print(f"wrote {html_path} and {json_path} ({data['total_seconds']:.1f} s)", file=sys.stderr)
    return Report(html_path, json_path, data, image, results)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;text-align:center}figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:.85em}
.bad{color:#b00;font-weight:bold}.good{color:#070;font-weight:bold}"""


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def _render(d: dict, image: Image.Image, hm, words, pid, cls, inc) -> str:
    from .information import PID_TERMS

    esc = html.escape
    big = max(192, image.width)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>diffusion-xai report: {esc(d['prompt'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>diffusion-xai report: &ldquo;{esc(d['prompt'])}&rdquo;</h1>",
             "<p class='note'>" + esc(", ".join(f"{k}={v}" for k, v in d["settings"].items()))
             + f"; total {d['total_seconds']:.1f} s, {sum(d['unet_evals'].values())} UNet evaluations. "
             "Report defaults are cheaper than the methods' own, see diffusion_xai/report.py.</p>"]
    parts.append(f"<section id='image'><h2>Image</h2>{_img_tag(_png_b64(image), 'generated image', big)}</section>")
    figs = "".join(f"<figure>{_img_tag(_png_b64(hm.overlay(w)), 'heatmap ' + w, 160)}"
                   f"<figcaption>{esc(w)}</figcaption></figure>" for w in words)
    parts.append("<section id='heatmaps'><h2>Word heatmaps (DAAM)</h2><p class='note'>Where each word's "
                 f"cross-attention went while the image was generated.</p><div class='row'>{figs}</div></section>")
    rows = [[pid.label(k), f"{getattr(pid, k):.4g}", f"{pid.stderr[k]:.2g}" if k in pid.stderr else ""]
            for k in PID_TERMS]
    parts.append(f"<section id='pid'><h2>PID of &lsquo;{esc(pid.word1)}&rsquo; and &lsquo;{esc(pid.word2)}&rsquo;"
                 "</h2><p class='note'>Conditional pointwise partial information decomposition (nats): "
                 "redundancy R, uniquenesses U, synergy S.</p><div class='row'>"
                 f"{_img_tag(_fig_b64(pid.plot()), 'PID maps', 640)}<div>{_img_tag(_fig_b64(pid.plot_bars()), 'PID bars', 440)}"
                 f"{_table(rows, ['term', 'nats', 's.e.'])}</div></div></section>")
    c = d["classification"]
    crow = [[k, f"{v:.3f}"] for k, v in sorted(c["probs"].items(), key=lambda kv: -kv[1])]
    parts.append("<section id='classification'><h2>Classifier's reading</h2>"
                 f"<p>Most likely caption: <b>{esc(c['prediction'])}</b>"
                 f"{'' if c['calibrated'] else ' (uncalibrated probabilities)'}</p><div class='row'>"
                 f"{_table(crow, ['candidate caption', 'probability'])}"
                 f"{_img_tag(_fig_b64(cls.plot(0, image_pil=image)), 'classification', 560)}</div></section>")
    verdict = ("<span class='good'>consistent</span>" if inc.consistent else "<span class='bad'>inconsistent</span>")
    wrow = [[w, f"{s:.4g}"] for w, s in inc.word_score_dict().items()]
    parts.append("<section id='inconsistency'><h2>Inconsistency check</h2>"
                 f"<p>Caption: &ldquo;{esc(inc.text)}&rdquo; &rarr; {verdict} (score {inc.score:.5f}, threshold "
                 f"{inc.threshold:.5f}); most inconsistent word: <b>{esc(inc.word)}</b>; flagged: "
                 f"{esc(', '.join(inc.inconsistent_words) or 'none')}.</p><div class='row'>"
                 f"{_img_tag(_fig_b64(inc.plot()), 'inconsistency', 560)}{_table(wrow, ['word', 'score'])}"
                 "</div></section>")
    trow = [[k, f"{v:.1f}", d["unet_evals"][k]] for k, v in d["seconds"].items()]
    parts.append(f"<section id='timings'><h2>Cost</h2>{_table(trow, ['section', 'seconds', 'UNet evals'])}"
                 "</section></body></html>")
    return "\n".join(parts)
