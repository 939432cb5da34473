"""One Gradio app for every diffusion-xai method: ``python demos/app.py`` or ``diffusion-xai demo``.

Tabs: Generate + heatmaps, PID, Classify, Inconsistency, Erase, Tweaks, and Audit (a small bias audit
from a TOML spec, :mod:`diffusion_xai.audit`; shown only when that package imports). The embedded ShapesWorld model by default; ``--model PATH_OR_ID`` loads any diffusers SD
pipeline (CUDA with float16 when a GPU is there, else CPU float32).

Concurrency (documented contract):

* every heavy event runs through Gradio's queue with ``concurrency_limit=1`` and one shared
  ``concurrency_id`` ("model"), so the browser-facing app runs one model request at a time and the
  others wait in line (the queue shows their position);
* independently of Gradio, every handler holds :attr:`DemoApp.lock` while it touches the model, so
  direct callers (tests, other front ends, several threads) are serialised too;
* hooks (heatmap recorders, tweak editors) live only inside the handler's ``with xp.hooks(...)``;
  an erasure edit is created inside the request and removed in ``finally`` (also on errors), so no
  request ever sees another request's hooks or edits, and the model is unchanged between requests.

Errors: every handler turns bad input into ``gr.Error`` with a readable message (the library's
``ValueError`` messages name the bad value and the allowed ones); anything unexpected becomes
``gr.Error("internal error (TypeName): message")`` and the traceback goes to the server log only.
Uploads are checked before decoding: at most :data:`MAX_UPLOAD_BYTES` bytes and
:data:`MAX_UPLOAD_PIXELS` pixels, a readable image file; they are resized to the model's native size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
import weakref
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local demo

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_xai.report import content_words, default_candidates  # noqa: E402

log = logging.getLogger("diffusion_xai.demo")

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_SEEDS = 8
DISPLAY_SIZE = 256  # small model images are shown upscaled (nearest) to this many pixels
PID_ORDER = ("R", "U1", "U2", "S", "I1", "I2")
MAX_AUDIT_IMAGES = 256  # images per audit request in the demo (PID entries: at most MAX_AUDIT_PID runs)
MAX_AUDIT_PID = 8

try:  # the Audit tab appears only when the audit package is installed and importable
    from diffusion_xai.audit import parse_spec, run_audit, write_report

    HAVE_AUDIT = True
except ImportError:  # pragma: no cover - depends on the checkout
    HAVE_AUDIT = False

DEMO_AUDIT_SPEC = """name = "demo colour audit"

[generation]
images_per_prompt = 8       # image k of every prompt uses seed + k
seed = 0
batch_size = 16

[prompts]
templates = ["a {shape}"]

[prompts.slots]
shape = ["circle", "cross"]

[attributes.color]
values = ["red", "green", "blue", "yellow", "purple", "orange"]

[judge]
kind = "oracle"             # the ShapesWorld oracle; "diffusion" judges with the model itself

[[counterfactuals]]
a = "a circle"
b = "a cross"
"""


_PIPELINE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------ helpers
def readable_errors(fn):
    """Decorator of the app's handlers: the whole handler runs under the pipeline's lock (the tokenizer,
    scheduler and hooks of a diffusers pipeline are shared mutable state: a fast tokenizer called without
    padding in one thread changes the padding of a concurrent call in another); bad input -> ``gr.Error``
    with the library's message; anything else -> a short ``gr.Error`` naming the exception type
    (traceback logged on the server, never shown)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        lock = getattr(args[0], "lock", None) if args else None
        try:
            with lock if lock is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise gr.Error(str(msg), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the UI must never show a stack trace
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {e}", print_exception=False) from None

    return wrapper


def show(img: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """Upscale small images (nearest neighbour) so 64 x 64 model images are visible."""
    if max(img.size) >= size:
        return img
    f = max(1, size // max(img.size))
    return img.resize((img.width * f, img.height * f), Image.NEAREST)


def fig_to_pil(fig) -> Image.Image:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def parse_seeds(text, limit: int = MAX_SEEDS) -> list[int]:
    """'0, 1, 2' -> [0, 1, 2]; clear errors for non-integers, negatives, duplicates or too many."""
    text = str(text if text is not None else "").strip()
    if not text:
        raise ValueError("give at least one seed, e.g. 0, 1, 2")
    seeds = []
    for s in text.replace(";", ",").split(","):
        s = s.strip()
        if not s:
            continue
        if not s.isdigit():
            raise ValueError(f"seed {s!r} is not a non-negative integer; give seeds like 0, 1, 2")
        seeds.append(int(s))
    if len(seeds) > limit:
        raise ValueError(f"at most {limit} seeds per request, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {text!r}")
    return seeds


def parse_seed(value) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a non-negative integer, got {value!r}") from None
    if f != int(f) or f < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return int(f)


def parse_captions(text) -> list[str]:
    """Class captions, one per line or ';'-separated."""
    text = str(text or "")
    return [c.strip() for line in text.splitlines() for c in line.split(";") if c.strip()]


def require_prompt(prompt, what: str = "prompt") -> str:
    if prompt is None or not str(prompt).strip():
        raise ValueError(f"the {what} is empty; type a caption, e.g. 'a red circle on the left'")
    return str(prompt).strip()


def colormap_overlay(image: Image.Image, m: np.ndarray, cmap: str = "inferno", alpha: float = 0.6,
                     signed: bool = False) -> Image.Image:
    """Blend a (H, W) map onto the image: signed maps symmetric about 0 ('coolwarm'), else 0..max."""
    import matplotlib

    if signed:
        lim = max(float(np.abs(m).max()), 1e-12)
        v = (m / lim + 1) / 2
        cmap = "coolwarm"
    else:
        v = m / max(float(m.max()), 1e-12)
    heat = matplotlib.colormaps[cmap](np.clip(v, 0, 1))[:, :, :3]
    base = np.asarray(image.convert("RGB")).astype(np.float32) / 255
    return Image.fromarray((((1 - alpha) * base + alpha * heat) * 255).round().astype(np.uint8))


def default_device_and_dtype():
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return None, None


def load_model(spec: str = "shapesworld"):
    """The embedded ShapesWorld model ('shapesworld'), 'tiny-random', a ShapesWorld checkpoint folder,
    or any diffusers folder / hub id (float16 on CUDA when available)."""
    from diffusion_xai.report_cli import load_model as report_load

    device, dtype = default_device_and_dtype()
    if spec in ("shapesworld", "tiny-random") or (Path(spec) / "training.json").exists():
        return report_load(spec, device)
    from diffusion_xai import XAIPipeline

    return XAIPipeline.from_pretrained(spec, torch_dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ the app
class DemoApp:
    """The handlers behind every tab, callable without a browser (tests call them directly).

    Args:
        xp: the :class:`~diffusion_xai.XAIPipeline` to serve.
        pid_samples / align_steps: the default PID samples and inconsistency alignment steps offered in
            the UI (the ShapesWorld report's defaults).
        classify_max_evals: UNet evaluation budget per classified image (None: the classifier's default).
    """

    def __init__(self, xp, pid_samples: int = 64, align_steps: int = 30, classify_max_evals: int | None = None):
        self.xp = xp
        self.classify_max_evals = classify_max_evals
        # one lock per diffusers pipeline: diffusers pipelines keep per-call state on the object, so two
        # apps (or XAIPipelines) wrapping the same pipeline must not generate at once
        self.lock = _PIPELINE_LOCKS.setdefault(xp.pipe, threading.RLock())
        self.pid_samples = pid_samples
        self.align_steps = align_steps
        cfg = xp.unet.config
        side = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.native = int(side) * xp.vae_scale_factor
        self.is_shapesworld = self.native == 64
        self.tmp = Path(tempfile.mkdtemp(prefix="diffusion_xai_demo_"))

    # ---------------------------------------------------------------- shared pieces
    def load_upload(self, path) -> Image.Image:
        """Check and decode an uploaded file: size limits before decoding, readable errors, RGB,
        resized to the model's native size."""
        if path is None:
            raise ValueError("no image: upload one, or give a prompt to generate it")
        path = getattr(path, "name", path)
        p = Path(str(path))
        if not p.exists():
            raise ValueError(f"uploaded file {p.name!r} is missing on the server; upload it again")
        n = p.stat().st_size
        if n > MAX_UPLOAD_BYTES:
            raise ValueError(f"upload {p.name!r} is {n / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
        try:
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_UPLOAD_PIXELS:
                    raise ValueError(f"upload {p.name!r} is {w} x {h} pixels; the limit is "
                                     f"{MAX_UPLOAD_PIXELS:,} pixels (e.g. 4096 x 4096)")
                im.load()
                img = im.convert("RGB")
        except ValueError:
            raise
        except Image.DecompressionBombError:
            raise ValueError(f"upload {p.name!r} is too large to decode safely; the limit is "
                             f"{MAX_UPLOAD_PIXELS:,} pixels (e.g. 4096 x 4096)") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"could not read {p.name!r} as an image ({type(e).__name__}: {e}); "
                             "upload a PNG or JPEG file") from None
        if img.size != (self.native, self.native):
            img = img.resize((self.native, self.native), Image.BICUBIC)
        return img

    def _image(self, upload, prompt, seed: int) -> tuple[Image.Image, str]:
        """The uploaded image, else one generated from ``prompt`` (call with the lock held)."""
        if upload is not None:
            return self.load_upload(upload), "uploaded image"
        if prompt is None or not str(prompt).strip():
            raise ValueError("no image: upload one, or give a prompt to generate it")
        prompt = str(prompt).strip()
        return self.xp.generate(prompt, seed=seed, progress=False).images[0], f"generated from {prompt!r}, seed {seed}"

    # ---------------------------------------------------------------- tabs
    @readable_errors
    def heatmaps(self, prompt, word="", seed=0, progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (image, gallery of every content word's overlay, the chosen word's overlay, info)."""
        prompt = require_prompt(prompt)
        seed = parse_seed(seed)
        word = (word or "").strip()
        progress(0.1, desc="generating under the attention recorder")
        res = self.xp.heatmaps(prompt, seed=seed, words=[word] if word else None, progress=False)
        words = content_words(prompt)
        if not words:
            raise ValueError(f"prompt {prompt!r} has no content word to map")
        progress(0.9, desc="overlays")
        gallery = [(show(res.overlay(w)), w) for w in words]
        chosen = show(res.overlay(word or words[0]))
        info = f"{len(words)} word maps; {res.unet_evals} UNet evaluations, seed {seed}"
        return show(res.images[0]), gallery, chosen, info

    @readable_errors
    def pid(self, prompt, word1, word2, seed=0, num_samples=None, progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (gallery of the six maps R, U1, U2, S, I1, I2, bar chart, table rows)."""
        prompt = require_prompt(prompt)
        seed = parse_seed(seed)
        n = int(num_samples or self.pid_samples)
        progress(0.1, desc=f"PID with {n} samples ({4 * n} UNet evaluations)")
        r = self.xp.pid(prompt, (word1 or "").strip(), (word2 or "").strip(), num_samples=n, seed=seed,
                        progress=False)
        progress(0.9, desc="plots")
        gallery = []
        for k in PID_ORDER:
            m = r.image_map(k).numpy()
            gallery.append((show(colormap_overlay(r.image, m, signed=bool(m.min() < 0))),
                            f"{r.label(k)} = {getattr(r, k):.3g} nats"))
        rows = [[r.label(k), round(getattr(r, k), 5)] for k in ("I1", "I2", "I12", "R", "U1", "U2", "S")]
        return gallery, fig_to_pil(r.plot_bars()), rows

    @readable_errors
    def classify(self, upload, prompt, classes_text, seed=0, progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (the image, {caption: probability}, probabilities as text lines, info)."""
        seed = parse_seed(seed)
        classes = parse_captions(classes_text)
        if not classes and prompt and str(prompt).strip():
            classes = default_candidates(str(prompt).strip())
        if len(classes) < 2:
            raise ValueError(f"give at least two candidate captions (one per line), got {len(classes)}")
        progress(0.1, desc="image")
        image, source = self._image(upload, prompt, seed)
        progress(0.3, desc=f"classifying among {len(classes)} captions")
        r = self.xp.classify(image, classes, seed=seed, max_evals=self.classify_max_evals, progress=False)
        probs = dict(zip(r.classes, r.probs[0].tolist()))
        text = "\n".join(f"{p:.4f}\t{c}" for c, p in sorted(probs.items(), key=lambda kv: -kv[1]))
        info = (f"{source}; prediction (lowest paired noise-prediction error): {r.labels[0]!r}; "
                f"{r.unet_evals[0]} UNet evaluations"
                + ("" if r.calibrated else "; probabilities uncalibrated (temperature 1)"))
        return show(image), probs, text, info

    @readable_errors
    def inconsistency(self, upload, prompt, caption, seed=0, align_steps=None, progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (figure: image | region | edit, verdict text, word scores rows)."""
        seed = parse_seed(seed)
        caption = require_prompt(caption, "caption")
        steps = int(align_steps or self.align_steps)
        progress(0.05, desc="image")
        image, source = self._image(upload, prompt, seed)
        progress(0.2, desc=f"aligning the caption ({steps} steps x 2), mask, edit")
        r = self.xp.localize_inconsistency(image, caption, align_steps=steps, seed=seed, progress=False)
        verdict = (f"{'consistent' if r.consistent else 'INCONSISTENT'}: score {r.score:.5f} (threshold "
                   f"{r.threshold:.5f}); most inconsistent word: {r.word!r}; flagged: "
                   f"{', '.join(r.inconsistent_words) or 'none'} ({source})")
        rows = [[w, round(s, 5)] for w, s in r.word_score_dict().items()]
        return fig_to_pil(r.plot()), verdict, rows

    @readable_errors
    def erase(self, concept, prompt, seeds_text="0, 1, 2", progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (before gallery, after gallery, adapter zip path, info). The edit exists only inside the
        request: created, used, saved and removed in ``finally``."""
        from diffusion_xai.erasure import shapesworld_templates

        concepts = [c.strip() for c in str(concept or "").split(",") if c.strip()]
        if not concepts:
            raise ValueError("give a concept to erase, e.g. circle")
        prompt = require_prompt(prompt)
        seeds = parse_seeds(seeds_text)
        templates = ["{}"]
        if self.is_shapesworld:
            try:
                templates = list(dict.fromkeys(t for c in concepts for t in shapesworld_templates(c)))
            except ValueError:
                templates = ["{}"]
        before, after = [], []
        for i, s in enumerate(seeds):
            progress((i, 2 * len(seeds) + 1), desc="before")
            before.append((show(self.xp.generate(prompt, seed=s, progress=False).images[0]), f"seed {s}"))
        progress((len(seeds), 2 * len(seeds) + 1), desc=f"erasing {', '.join(concepts)}")
        edit = self.xp.erase(concepts, templates=templates, progress=False)
        try:
            for i, s in enumerate(seeds):
                progress((len(seeds) + 1 + i, 2 * len(seeds) + 1), desc="after")
                after.append((show(self.xp.generate(prompt, seed=s, progress=False).images[0]), f"seed {s}"))
            folder = Path(tempfile.mkdtemp(dir=self.tmp))
            edit.save(folder / "adapter")
            info = (f"erased {concepts} (closed form, rank {edit.rank}, {edit.edit_time_s:.2f} s); "
                    "the adapter is removed again after this request")
        finally:
            edit.remove()
        zpath = shutil.make_archive(str(folder / ("erase_" + "_".join(concepts))), "zip", folder / "adapter")
        return before, after, zpath, info

    @readable_errors
    def tweaks(self, prompt, specs_text, seeds_text="0, 1", progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (gallery: plain and tweaked per seed, info). Specs as the CLI's ``--tweak``, one per line."""
        from diffusion_xai.tweaks_cli import parse_tweak

        prompt = require_prompt(prompt)
        specs = [s.strip() for s in str(specs_text or "").splitlines() if s.strip()]
        if not specs:
            raise ValueError("give at least one tweak, e.g. cbs:circle,square  or  reweight:red=2")
        tweaks = [parse_tweak(s) for s in specs]
        seeds = parse_seeds(seeds_text)
        gallery = []
        for i, s in enumerate(seeds):
            progress((i, len(seeds)), desc=f"seed {s}")
            plain = self.xp.generate(prompt, seed=s, progress=False).images[0]
            tweaked = self.xp.generate(prompt, seed=s, tweaks=tweaks, progress=False).images[0]
            gallery += [(show(plain), f"plain, seed {s}"), (show(tweaked), f"tweaked, seed {s}")]
        return gallery, f"{len(tweaks)} tweak(s): {'; '.join(specs)}"

    @readable_errors
    def audit(self, spec_text, progress=gr.Progress()):  # noqa: B008 (the Gradio idiom)
        """-> (the audit's HTML report, its summary, the report file). Runs into a fresh folder per request;
        at most :data:`MAX_AUDIT_IMAGES` images and :data:`MAX_AUDIT_PID` PID runs."""
        if not HAVE_AUDIT:
            raise ValueError("the audit package (diffusion_xai.audit) is not available in this installation")
        if spec_text is None or not str(spec_text).strip():
            raise ValueError("the audit spec is empty; start from the example spec")
        spec = parse_spec(str(spec_text), "spec")
        n = len(spec.items())
        if n > MAX_AUDIT_IMAGES:
            raise ValueError(f"this spec asks for {n} images; the demo runs at most {MAX_AUDIT_IMAGES} per request "
                             "(lower images_per_prompt or the prompts; run big audits with `diffusion-xai audit run`)")
        npid = len(spec.pid_items()) if spec.pid else 0
        if npid > MAX_AUDIT_PID:
            raise ValueError(f"this spec asks for {npid} PID runs; the demo runs at most {MAX_AUDIT_PID}")
        out = Path(tempfile.mkdtemp(prefix="audit_", dir=self.tmp))
        progress(0.05, desc=f"generating and judging {n} images")
        res = run_audit(spec, out, xp=self.xp, progress=False)
        progress(0.9, desc="report")
        summary = write_report(out, grids=False)
        page = (out / "report.html").read_text()
        body = page.split("<body>", 1)[-1].rsplit("</body>", 1)[0]
        info = f"{res['rows']} images judged in {res['seconds']:.1f} s"
        return body, summary, str(out / "report.html"), info


# ------------------------------------------------------------------------------------------ UI
def build_ui(app: DemoApp, audit_spec: str = DEMO_AUDIT_SPEC) -> gr.Blocks:
    """The Blocks UI: one tab per capability; every heavy event queued with concurrency 1.
    ``audit_spec``: the spec the Audit tab starts with."""
    heavy = dict(concurrency_limit=1, concurrency_id="model")
    ex = "a red circle on the left and a blue square on the right" if app.is_shapesworld else "a red circle"
    with gr.Blocks(title="diffusion-xai") as demo:
        gr.Markdown("# diffusion-xai\nExplain and edit a text-to-image diffusion model. One request runs at a "
                    "time; others wait in the queue.")
        with gr.Tab("Generate + heatmaps"):
            with gr.Row():
                hp = gr.Textbox(ex, label="prompt", elem_id="hm-prompt")
                hw = gr.Textbox("", label="word to show (optional)", elem_id="hm-word")
                hs = gr.Number(0, label="seed", precision=0, elem_id="hm-seed")
            hb = gr.Button("Generate", variant="primary", elem_id="hm-run")
            with gr.Row():
                himg = gr.Image(label="image", elem_id="hm-image", type="pil")
                hsel = gr.Image(label="chosen word", elem_id="hm-chosen", type="pil")
            hgal = gr.Gallery(label="word heatmaps", elem_id="hm-gallery", columns=6)
            hinfo = gr.Textbox(label="info", elem_id="hm-info")
            hb.click(app.heatmaps, [hp, hw, hs], [himg, hgal, hsel, hinfo], **heavy)
        with gr.Tab("PID"):
            with gr.Row():
                pp = gr.Textbox(ex, label="prompt", elem_id="pid-prompt")
                p1 = gr.Textbox("red", label="word 1", elem_id="pid-w1")
                p2 = gr.Textbox("circle", label="word 2", elem_id="pid-w2")
                ps = gr.Number(0, label="seed", precision=0)
                pn = gr.Slider(4, 256, value=app.pid_samples, step=4, label="samples (4 UNet evals each)")
            pb = gr.Button("Run PID", variant="primary", elem_id="pid-run")
            pgal = gr.Gallery(label="maps", elem_id="pid-gallery", columns=6)
            with gr.Row():
                pbar = gr.Image(label="image-level terms", elem_id="pid-bars", type="pil")
                ptab = gr.Dataframe(headers=["term", "nats"], label="values", elem_id="pid-table")
            pb.click(app.pid, [pp, p1, p2, ps, pn], [pgal, pbar, ptab], **heavy)
        with gr.Tab("Classify"):
            with gr.Row():
                cu = gr.File(label="upload an image (or leave empty and generate from the prompt)",
                             file_types=["image"], elem_id="cls-upload")
                cp = gr.Textbox("a red circle", label="prompt (used when nothing is uploaded)", elem_id="cls-prompt")
                cc = gr.Textbox("a red circle\na blue circle\na green circle", lines=4,
                                label="candidate captions, one per line (empty: variants of the prompt)",
                                elem_id="cls-classes")
                cs = gr.Number(0, label="seed", precision=0)
            cb = gr.Button("Classify", variant="primary", elem_id="cls-run")
            with gr.Row():
                cimg = gr.Image(label="image", elem_id="cls-image", type="pil")
                clab = gr.Label(label="probabilities", elem_id="cls-label")
            ctext = gr.Textbox(label="probability<TAB>caption", lines=4, elem_id="cls-probs")
            cinfo = gr.Textbox(label="info", elem_id="cls-info")
            cb.click(app.classify, [cu, cp, cc, cs], [cimg, clab, ctext, cinfo], **heavy)
        with gr.Tab("Inconsistency"):
            with gr.Row():
                iu = gr.File(label="upload an image (or generate from the prompt)", file_types=["image"],
                             elem_id="inc-upload")
                ip = gr.Textbox("a red circle", label="prompt (used when nothing is uploaded)", elem_id="inc-prompt")
                ic = gr.Textbox("a blue circle", label="caption to check", elem_id="inc-caption")
                iseed = gr.Number(0, label="seed", precision=0)
                isteps = gr.Slider(1, 100, value=app.align_steps, step=1, label="alignment steps")
            ib = gr.Button("Check", variant="primary", elem_id="inc-run")
            ifig = gr.Image(label="image | inconsistent region | edit", elem_id="inc-figure", type="pil")
            iverdict = gr.Textbox(label="verdict", elem_id="inc-verdict")
            iscores = gr.Dataframe(headers=["word", "score"], label="word scores", elem_id="inc-scores")
            ib.click(app.inconsistency, [iu, ip, ic, iseed, isteps], [ifig, iverdict, iscores], **heavy)
        with gr.Tab("Erase"):
            with gr.Row():
                ec = gr.Textbox("circle", label="concept(s) to erase, comma-separated", elem_id="er-concept")
                ep = gr.Textbox("a red circle", label="prompt to compare", elem_id="er-prompt")
                es = gr.Textbox("0, 1, 2", label="seeds", elem_id="er-seeds")
            eb = gr.Button("Erase and compare", variant="primary", elem_id="er-run")
            with gr.Row():
                ebefore = gr.Gallery(label="before", elem_id="er-before", columns=4)
                eafter = gr.Gallery(label="after (same seeds)", elem_id="er-after", columns=4)
            efile = gr.File(label="adapter (diffusers LoRA + edit.json, zip)", elem_id="er-file")
            einfo = gr.Textbox(label="info", elem_id="er-info")
            eb.click(app.erase, [ec, ep, es], [ebefore, eafter, efile, einfo], **heavy)
        with gr.Tab("Tweaks"):
            with gr.Row():
                tp = gr.Textbox("a red circle and a blue square" if app.is_shapesworld else "a red circle",
                                label="prompt", elem_id="tw-prompt")
                tt = gr.Textbox("reweight:red=2", lines=3, label="tweaks, one per line (cbs:W1,W2 | nms | "
                                "reweight:W=F | remove:W | swap:W=OTHER | interpolate:W=OTHER:t=T)",
                                elem_id="tw-specs")
                ts = gr.Textbox("0, 1", label="seeds", elem_id="tw-seeds")
            tb = gr.Button("Generate both", variant="primary", elem_id="tw-run")
            tgal = gr.Gallery(label="plain | tweaked, per seed", elem_id="tw-gallery", columns=2)
            tinfo = gr.Textbox(label="info", elem_id="tw-info")
            tb.click(app.tweaks, [tp, tt, ts], [tgal, tinfo], **heavy)
        if HAVE_AUDIT:
            with gr.Tab("Audit"):
                aspec = gr.Code(audit_spec, language=None, label="audit spec (TOML; see "
                                "examples/shapesworld_audit.toml)", elem_id="au-spec", lines=18)
                ab = gr.Button("Run audit", variant="primary", elem_id="au-run")
                ainfo = gr.Textbox(label="info", elem_id="au-info")
                ahtml = gr.HTML(elem_id="au-report")
                afile = gr.File(label="report.html", elem_id="au-file")
                ajson = gr.JSON(label="summary", elem_id="au-summary")
                ab.click(app.audit, [aspec], [ahtml, ajson, afile, ainfo], **heavy)
    demo.queue(default_concurrency_limit=1)
    return demo


def create_app(xp=None, model: str = "shapesworld", **kwargs) -> tuple[DemoApp, gr.Blocks]:
    """The handlers and their UI for ``xp`` (default: ``load_model(model)``)."""
    app = DemoApp(xp if xp is not None else load_model(model), **kwargs)
    return app, build_ui(app)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffusion-xai demo", description="the diffusion-xai Gradio app")
    p.add_argument("--model", default="shapesworld", help="'shapesworld' (embedded, default), 'tiny-random', a "
                                                          "ShapesWorld checkpoint folder, or a diffusers folder / hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    _, demo = create_app(model=a.model)
    demo.launch(server_name=a.host, server_port=a.port, max_file_size=MAX_UPLOAD_BYTES, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
