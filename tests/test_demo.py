"""The end-to-end report, the Gradio app's handlers (concurrency, bad input) and the app in a real browser.

Everything runs on the tiny random SD 1.x pipeline (its pictures mean nothing; the tests check the
plumbing against known answers: the report's embedded image is the seed's image, heatmaps under
concurrency equal the sequential ones, PID identities hold, probabilities sum to 1, the model is
unchanged after every request, every bad input gives a readable message).

The browser test needs gradio, playwright and Debian's chromium (``/usr/bin/chromium``); it is skipped
when they are missing. Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import struct
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_xai import XAIPipeline
from diffusion_xai.report import build_report, default_candidates, default_contradiction, default_pair

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
HAVE_BROWSER = (HAVE_GRADIO and importlib.util.find_spec("playwright") is not None and os.path.exists(CHROMIUM))
PROMPT = "a red circle and a blue square"


def _tiny_audit_spec(mod) -> str:
    """The demo's audit spec at the size the oracle judge reads (64 x 64), one image per prompt."""
    return mod.DEMO_AUDIT_SPEC.replace("images_per_prompt = 8", "images_per_prompt = 1\nheight = 64\nwidth = 64")


def _xp(tiny):
    return XAIPipeline(tiny("sd1"), default_steps=4)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _unet_state(xp) -> dict:
    return {k: v.clone() for k, v in xp.unet.state_dict().items()}


# ============================================================================ (a) the report
def test_report_defaults_known_answers():
    assert default_pair("a red circle on the left and a blue square") == ("red", "circle")
    assert default_pair("a large square beside a green cross") == ("green", "cross")
    assert default_pair("a giraffe eating leaves") == ("giraffe", "eating")
    assert default_contradiction(PROMPT) == "a green circle and a blue square"  # first other colour
    assert default_contradiction("a circle") == "a square"
    assert default_candidates(PROMPT) == [PROMPT, "a green circle and a blue square", "a blue circle and a blue square",
                                          "a yellow circle and a blue square"]
    with pytest.raises(ValueError, match="no colour .* or shape"):
        default_contradiction("a giraffe")


def test_report_writes_every_section(tiny, tmp_path):
    xp = _xp(tiny)
    calls = []
    r = build_report(xp, PROMPT, out_dir=tmp_path, seed=3, num_samples=4, align_steps=2, num_mask_seeds=2,
                     word_samples=2, classify_max_evals=32, progress=False,
                     callback=lambda i, n, s: calls.append((i, n)))
    page = (tmp_path / "report.html").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    for sec in ("image", "heatmaps", "pid", "classification", "inconsistency", "timings"):
        assert f"<section id='{sec}'>" in page
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    words = ["red", "circle", "blue", "square"]
    # image + one overlay per content word + PID maps + PID bars + classifier plot + inconsistency plot
    assert len(imgs) == 1 + len(words) + 4
    decoded = [Image.open(io.BytesIO(base64.b64decode(b))) for b in imgs]
    # the embedded image is exactly the seed's generation, and the overlays are that image's heatmaps
    same = xp.generate(PROMPT, seed=3, progress=False).images[0]
    assert np.array_equal(_pixels(decoded[0]), _pixels(same))
    hm = r.results["heatmaps"]
    for k, w in enumerate(words):
        assert np.array_equal(_pixels(decoded[1 + k]), _pixels(hm.overlay(w)))
    assert data["heatmap_words"] == words
    # PID: the pair, exact cost, and the decomposition identities on the written numbers
    s = data["pid"]["scalars"]
    assert data["word_pair"] == ["red", "circle"]
    assert data["unet_evals"]["pid"] == 4 * 4
    assert s["I1"] == pytest.approx(s["R"] + s["U1"], abs=1e-9)
    assert s["I2"] == pytest.approx(s["R"] + s["U2"], abs=1e-9)
    assert s["I12"] == pytest.approx(s["R"] + s["U1"] + s["U2"] + s["S"], abs=1e-9)
    # classifier: the default candidates, probabilities summing to 1, the prediction the most probable
    c = data["classification"]
    assert c["classes"] == default_candidates(PROMPT)
    assert sum(c["probs"].values()) == pytest.approx(1.0, abs=1e-9)
    assert c["prediction"] in c["classes"]
    assert data["contradicting_caption"] == "a green circle and a blue square"
    assert data["inconsistency"]["text"] == data["contradicting_caption"]
    assert "a green circle and a blue square" in page
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert set(data["seconds"]) == {"heatmaps", "pid", "classification", "inconsistency"}


def test_report_bad_input_before_compute(tiny, tmp_path):
    xp = _xp(tiny)
    e0 = xp.unet_evals
    with pytest.raises(ValueError, match="word 'dog' is not in prompt"):
        build_report(xp, PROMPT, word_pair=("red", "dog"), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="two different words"):
        build_report(xp, PROMPT, word_pair=("red", "red"), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="at least two"):
        build_report(xp, PROMPT, classes=["only one"], out_dir=tmp_path, progress=False)
    assert xp.unet_evals == e0 and not (tmp_path / "report.html").exists()


def test_report_cli_errors_are_readable(capsys):
    from diffusion_xai.report_cli import main

    assert main([PROMPT, "--model", "tiny-random", "--pair", "red", "--quiet"]) == 2
    assert "--pair needs two comma-separated words" in capsys.readouterr().err


# ============================================================================ (b) the handlers
gr = importlib.import_module("gradio") if HAVE_GRADIO else None


def _app_module():
    from diffusion_xai.demo_cli import load_app_module

    return load_app_module()


def _lock_free(lock) -> bool:
    """True when no thread holds ``lock`` (an RLock: tried from a fresh thread, so the caller's own hold counts)."""
    got = []

    def probe():
        ok = lock.acquire(blocking=False)
        got.append(ok)
        if ok:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got[0]


@pytest.fixture(scope="module")
def demo(tiny):
    mod = _app_module()
    from diffusion_xai.testing import tiny_pipeline

    # a pipeline of its own: nothing another test module did to the shared tiny pipeline can leak in
    xp = XAIPipeline(tiny_pipeline("sd1"), default_steps=4)
    return mod, mod.DemoApp(xp, pid_samples=4, align_steps=2, classify_max_evals=32)


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio not installed (the demo extra)")
def test_concurrent_heatmap_requests_get_their_own_maps(demo):
    mod, app = demo
    prompts = ["a red circle and a blue square", "a green cross on the left"]
    seq = [app.heatmaps(p, "", 5) for p in prompts]
    out = [None, None]
    barrier = threading.Barrier(2)
    threads_main = torch.get_num_threads()

    def run(i):
        torch.set_num_threads(threads_main)  # OpenMP thread counts are per thread: same reduction order
        barrier.wait()
        out[i] = app.heatmaps(prompts[i], "", 5)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, o in zip(seq, out):
        assert [c for _, c in o[1]] == [c for _, c in s[1]]  # the words of its own prompt
        assert np.array_equal(_pixels(o[0]), _pixels(s[0]))
        for (a, _), (b, _) in zip(o[1], s[1]):
            assert np.array_equal(_pixels(a), _pixels(b))
    assert [c for _, c in out[1][1]] == ["green", "cross", "left"]
    assert not app.xp._managers  # no hook left installed


def _png_claiming(w: int, h: int) -> bytes:
    """A valid 1 x 1 PNG whose header is rewritten to claim w x h pixels (a decompression-bomb header)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    ihdr = b[12:29]
    ihdr[4:12] = struct.pack(">II", w, h)
    b[12:29] = ihdr
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(b)


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio not installed (the demo extra)")
def test_bad_input_every_tab_readable_and_app_keeps_serving(demo, tmp_path):
    mod, app = demo
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 50)
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_claiming(5000, 5000))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(20000, 20000))
    heavy = tmp_path / "heavy.png"
    heavy.write_bytes(b"\0" * (mod.MAX_UPLOAD_BYTES + 1))
    reference = app.heatmaps(PROMPT, "", 1)
    state = _unet_state(app.xp)
    cases = [
        (app.heatmaps, ("", "", 0), "prompt is empty"),
        (app.heatmaps, (PROMPT, "dog", 0), "word 'dog' is not in prompt"),
        (app.heatmaps, (PROMPT, "", -1), "seed must be a non-negative integer"),
        (app.pid, (PROMPT, "red", "dog", 0, 4), "word 'dog' is not in prompt"),
        (app.pid, (PROMPT, "red", "red", 0, 4), "same word"),
        (app.classify, (str(corrupt), "", "a red circle\na blue circle", 0), "could not read 'corrupt.png' as an image"),
        (app.classify, (str(huge), "", "a red circle\na blue circle", 0), "5000 x 5000 pixels; the limit"),
        (app.classify, (str(bomb), "", "a red circle\na blue circle", 0), "too large to decode safely"),
        (app.classify, (str(heavy), "", "a red circle\na blue circle", 0), "MB; the limit is 20 MB"),
        (app.classify, (None, "", "a red circle\na blue circle", 0), "no image: upload one"),
        (app.classify, (None, "a red circle", "a red circle", 0), "at least two candidate captions"),
        (app.inconsistency, (str(corrupt), "", "a blue circle", 0, 2), "could not read"),
        (app.inconsistency, (None, "a red circle", "  ", 0, 2), "caption is empty"),
        (app.erase, ("", PROMPT, "0"), "give a concept to erase"),
        (app.erase, ("circle", PROMPT, "0, x"), "seed 'x' is not a non-negative integer"),
        (app.erase, ("circle", PROMPT, ",".join(map(str, range(20)))), "at most 8 seeds"),
        (app.tweaks, (PROMPT, "bogus:red", "0"), "unknown tweak 'bogus'"),
        (app.tweaks, (PROMPT, "reweight:dog=2", "0"), "dog"),
        (app.tweaks, (PROMPT, "", "0"), "at least one tweak"),
    ]
    for fn, args, msg in cases:
        with pytest.raises(gr.Error) as ei:
            fn(*args)
        text = ei.value.message
        assert msg in text, (fn.__name__, args, text)
        assert "Traceback" not in text and "File \"" not in text
    # still serving, with the same answers, and the model untouched
    again = app.heatmaps(PROMPT, "", 1)
    assert np.array_equal(_pixels(again[0]), _pixels(reference[0]))
    assert all(torch.equal(v, state[k]) for k, v in app.xp.unet.state_dict().items())
    assert _lock_free(app.lock)


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio not installed (the demo extra)")
def test_erase_and_tweaks_leave_the_model_as_it_was(demo, tmp_path):
    mod, app = demo
    xp = app.xp
    state = _unet_state(xp)
    base = xp.generate(PROMPT, seed=0, progress=False).images[0]
    before, after, zpath, info = app.erase("circle", PROMPT, "0, 1")
    assert len(before) == len(after) == 2 and "circle" in info
    assert np.array_equal(_pixels(before[0][0]), _pixels(mod.show(base)))
    assert not np.array_equal(_pixels(before[0][0]), _pixels(after[0][0]))  # the edit changed the image
    import zipfile

    names = zipfile.ZipFile(zpath).namelist()
    assert "pytorch_lora_weights.safetensors" in names and "edit.json" in names
    assert list(state) == list(xp.unet.state_dict())  # the LoRA wrappers are gone
    assert all(torch.equal(v, state[k]) for k, v in xp.unet.state_dict().items())
    assert np.array_equal(_pixels(xp.generate(PROMPT, seed=0, progress=False).images[0]), _pixels(base))
    gallery, info = app.tweaks(PROMPT, "reweight:red=3", "0")
    assert len(gallery) == 2 and np.array_equal(_pixels(gallery[0][0]), _pixels(mod.show(base)))
    # classify: probabilities sum to 1 over the given captions
    img, probs, text, info = app.classify(None, "a red circle", "a red circle\na blue circle\na green circle", 0)
    assert list(probs) and sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert len(text.splitlines()) == 3


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio not installed (the demo extra)")
def test_audit_tab(demo):
    mod, app = demo
    if not mod.HAVE_AUDIT:
        pytest.skip("the audit package is not importable")
    body, summary, path, info = app.audit(_tiny_audit_spec(mod))
    assert summary["images"] == summary["expected_images"] == 2 and summary["complete"]
    assert sorted(summary["prompts"]) == ["a circle", "a cross"]
    assert "Audit: demo colour audit" in body and Path(path).read_text().count("<h1>") == 1
    assert info.startswith("2 images judged")
    for bad, msg in [("", "audit spec is empty"), ("name = [", "not valid TOML"),
                     (mod.DEMO_AUDIT_SPEC.replace("images_per_prompt = 8", "images_per_prompt = 500"),
                      "at most 256 per request"),
                     (mod.DEMO_AUDIT_SPEC.replace('kind = "oracle"', 'kind = "nope"'), "judge kind 'nope'")]:
        with pytest.raises(gr.Error, match=re.escape(msg)):
            app.audit(bad)
    assert _lock_free(app.lock)


# ============================================================================ (c) a real browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not HAVE_BROWSER, reason="needs gradio, playwright and /usr/bin/chromium (see .ci/run)")
def test_every_tab_in_a_real_browser(demo, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    mod, app = demo
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    ui = mod.build_ui(app, audit_spec=_tiny_audit_spec(mod))
    ui.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
              max_file_size=mod.MAX_UPLOAD_BYTES)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(good)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            page.goto(f"http://127.0.0.1:{port}/")
            try:

                def fill(elem_id, value):
                    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
                    box.fill(value)

                def tab(name):
                    page.get_by_role("tab", name=name).click()

                def error_shown(text):
                    expect(page.get_by_text(text).first).to_be_visible()
                    for close in page.locator(".toast-close").all():
                        close.click()

                # Generate + heatmaps: one overlay per content word
                fill("hm-prompt", PROMPT)
                page.click("#hm-run")
                expect(page.locator("#hm-gallery img")).to_have_count(4)
                expect(page.locator("#hm-image img")).to_have_count(1)
                expect(page.locator("#hm-info textarea")).to_have_value(re.compile("4 word maps"))
                page.screenshot(path=str(ARTIFACTS / "demo_heatmaps.png"), full_page=True)
                fill("hm-word", "dog")
                page.click("#hm-run")
                error_shown("word 'dog' is not in prompt")
                page.screenshot(path=str(ARTIFACTS / "demo_heatmaps_error.png"), full_page=True)

                # PID: six maps and the bar chart
                tab("PID")
                fill("pid-prompt", PROMPT)
                page.click("#pid-run")
                expect(page.locator("#pid-gallery img")).to_have_count(6)
                expect(page.locator("#pid-bars img")).to_have_count(1)
                page.screenshot(path=str(ARTIFACTS / "demo_pid.png"), full_page=True)
                fill("pid-w2", "dog")
                page.click("#pid-run")
                error_shown("word 'dog' is not in prompt")

                # Classify: an upload, probabilities summing to 1; a corrupt upload -> message
                tab("Classify")
                page.locator("#cls-upload input[type=file]").set_input_files(str(good))
                expect(page.locator("#cls-upload")).to_contain_text("good.png")
                fill("cls-classes", "a red circle\na blue circle\na green circle")
                page.click("#cls-run")
                probs = page.locator("#cls-probs textarea")
                expect(probs).to_have_value(re.compile(r"\d\.\d{4}\t"))
                vals = [float(line.split("\t")[0]) for line in probs.input_value().splitlines()]
                assert len(vals) == 3 and sum(vals) == pytest.approx(1.0, abs=2e-3)
                expect(page.locator("#cls-image img")).to_have_count(1)
                page.screenshot(path=str(ARTIFACTS / "demo_classify.png"), full_page=True)

                # Inconsistency: generated image vs a contradicting caption
                tab("Inconsistency")
                fill("inc-prompt", "a red circle")
                fill("inc-caption", "a blue circle")
                page.click("#inc-run")
                expect(page.locator("#inc-verdict textarea")).to_have_value(re.compile("consistent: score"))
                expect(page.locator("#inc-figure img")).to_have_count(1)
                page.screenshot(path=str(ARTIFACTS / "demo_inconsistency.png"), full_page=True)
                fill("inc-caption", "")
                page.click("#inc-run")
                error_shown("caption is empty")
                fill("inc-caption", "a blue circle")
                page.locator("#inc-upload input[type=file]").set_input_files(str(corrupt))
                expect(page.locator("#inc-upload")).to_contain_text("corrupt.png")
                page.click("#inc-run")
                error_shown("could not read 'corrupt.png' as an image")
                page.screenshot(path=str(ARTIFACTS / "demo_inconsistency_error.png"), full_page=True)

                # Erase: before/after on the same seeds, and the adapter to download
                tab("Erase")
                fill("er-seeds", "0, 1")
                page.click("#er-run")
                expect(page.locator("#er-before img")).to_have_count(2)
                expect(page.locator("#er-after img")).to_have_count(2)
                expect(page.locator("#er-file a").first).to_have_attribute("href", re.compile(r"\.zip"))
                page.screenshot(path=str(ARTIFACTS / "demo_erase.png"), full_page=True)
                fill("er-seeds", "0, x")
                page.click("#er-run")
                error_shown("seed 'x' is not a non-negative integer")

                # Tweaks: plain | tweaked per seed
                tab("Tweaks")
                fill("tw-seeds", "0, 1")
                page.click("#tw-run")
                expect(page.locator("#tw-gallery img")).to_have_count(4)
                page.screenshot(path=str(ARTIFACTS / "demo_tweaks.png"), full_page=True)
                fill("tw-specs", "bogus:red")
                page.click("#tw-run")
                error_shown("unknown tweak 'bogus'")

                # Audit (when the package is there): a report for the spec; a broken spec -> message
                if mod.HAVE_AUDIT:
                    tab("Audit")
                    page.click("#au-run")
                    expect(page.locator("#au-info textarea")).to_have_value(re.compile("2 images judged"))
                    expect(page.locator("#au-report")).to_contain_text("Audit: demo colour audit")
                    page.screenshot(path=str(ARTIFACTS / "demo_audit.png"), full_page=True)
                    page.locator("#au-spec .cm-content").click()
                    page.keyboard.press("Control+A")
                    page.keyboard.type("this is not toml")
                    page.click("#au-run")
                    error_shown("not valid TOML")

                # still serving after all the errors
                tab("Generate + heatmaps")
                fill("hm-word", "")
                page.click("#hm-run")
                expect(page.locator("#hm-info textarea")).to_have_value(re.compile("4 word maps"))
                assert "Traceback" not in page.content()
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "demo_failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        ui.close()
    assert not app.xp._managers


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
