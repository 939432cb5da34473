"""Bias audits: metric formulas against hand-computed values, the oracle recovering the TRUE injected
ShapesWorld biases from the generator's own renders, kill-and-resume, changed and bad specs, the 2-process
sharded run, judges (CLIP from a tiny random checkpoint, the diffusion model) and the report files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion_xai import XAIPipeline
from diffusion_xai.audit import (
    CLIPJudge,
    SpecChangedError,
    SpecError,
    cas,
    chi_square,
    distribution_bias,
    jaccard_hallucination,
    load_rows,
    model_generator,
    parse_spec,
    render_generator,
    run_audit,
    total_variation,
    uce_delta,
    wilson_interval,
    write_report,
)
from diffusion_xai.audit.cli import main
from diffusion_xai.audit.judges import ModelJudge, prefers_empty
from diffusion_xai.audit.runner import load_pid_rows
from diffusion_xai.shapesworld import BIASES, attribute_distribution

ROOT = Path(__file__).resolve().parents[1]
SHAPES_SPEC = """
name = "renders"
[generation]
images_per_prompt = {n}
seed = 0
batch_size = {batch}
[prompts]
templates = ["a {{shape}}"]
[prompts.slots]
shape = ["circle", "square", "triangle", "cross"]
[attributes.color]
values = ["red", "green", "blue", "yellow", "purple", "orange"]
[attributes.size]
values = ["small", "large"]
[[counterfactuals]]
a = "a circle"
b = "a cross"
"""
# the tiny random SD at 32x32, judged by the model itself among two colours (4 UNet rows per image)
TINY_SPEC = """
name = "tiny"
[generation]
images_per_prompt = {n}
steps = 2
guidance = 2.0
height = 32
width = 32
batch_size = {batch}
[prompts]
templates = ["a {{shape}}"]
[prompts.slots]
shape = ["circle", "square"]
[attributes.color]
values = ["red", "blue"]
templates = ["{{}}"]
[judge]
kind = "diffusion"
miss_rate = false
options = {{schedule = "reference", stages = [[2, 1]]}}
"""


def _spec(text: str, **kw):
    return parse_spec(text.format(**kw), "spec.toml")


def _key(rows):
    return [(r["prompt_index"], r["sample"], r["prompt"], r["seed"], r["path"], r["labels"], r["detected"], r["miss"])
            for r in rows]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


# ------------------------------------------------------------------------------------------------ metrics
def test_wilson_interval_known_values():
    # 8/10: published Wilson 95% interval (0.4902, 0.9433); 0/10: upper bound z^2/(n+z^2) = 0.2775
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490165, abs=1e-5) and hi == pytest.approx(0.943318, abs=1e-5)
    lo, hi = wilson_interval(0, 10)
    z2 = 1.959963984540054 ** 2
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


@pytest.mark.parametrize("k,n", [(8, 10), (1, 10), (29, 200), (16, 200), (150, 200), (0, 30), (30, 30)])
def test_continuity_corrected_wilson_bounds_solve_the_corrected_score_test(k, n):
    """The corrected interval is {p : |k - n p| - 1/2 <= z sqrt(n p (1 - p))}: at each bound inside (0, 1)
    the two sides are equal, just inside it holds, just outside it fails; it contains the plain interval."""
    z = 1.959963984540054
    lo, hi = wilson_interval(k, n, continuity=True)
    plain = wilson_interval(k, n)
    assert lo <= plain[0] and hi >= plain[1]

    def gap(p):  # <= 0 inside the interval
        return abs(k - n * p) - 0.5 - z * math.sqrt(n * p * (1 - p))

    for b, inward in ((lo, +1), (hi, -1)):
        if 0 < b < 1:
            assert gap(b) == pytest.approx(0.0, abs=1e-9)
            assert gap(b + inward * 1e-6) < 0 < gap(b - inward * 1e-6)
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


def test_distribution_metrics_known_values():
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(0.5)
    stat, p = chi_square({"a": 30, "b": 10}, {"a": 0.5, "b": 0.5})  # (10^2 + 10^2) / 20
    assert stat == pytest.approx(10.0) and p == pytest.approx(math.erfc(math.sqrt(10 / 2)), rel=1e-9)
    assert chi_square({"a": 1, "b": 3}, {"a": 0.0, "b": 1.0})[0] == math.inf
    assert cas({"r": 0.8, "g": 0.2}, {"r": 0.5, "g": 0.5}) == pytest.approx(0.7 / 1.3)
    assert cas({"r": 1.0}, {"r": 1.0}) == 1.0 and cas({"r": 1.0}, {"g": 1.0}) == 0.0
    assert distribution_bias([0, 10, 0]) == pytest.approx(0.25)  # [1, 0, 0]: one trapezoid of 1/2 * 1/2
    assert distribution_bias([2, 4, 0]) == pytest.approx(0.5)  # [1, .5, 0]
    assert distribution_bias([3, 3, 3, 3]) == 1.0
    assert jaccard_hallucination({"circle"}, {"circle", "red"}) == pytest.approx(0.5)
    assert jaccard_hallucination({"circle"}, {"square"}) == 1.0 and jaccard_hallucination(set(), set()) == 0.0
    assert uce_delta([{"m": 0.8, "f": 0.2}, {"m": 0.5, "f": 0.5}], {"m": 0.5, "f": 0.5}) == pytest.approx(0.3)
    assert uce_delta([{"r": 1.0, "g": 0.0, "b": 0.0}], {v: 1 / 3 for v in "rgb"}) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ truth
def test_oracle_recovers_the_true_injected_biases_from_renders(tmp_path):
    """Audit the ShapesWorld generator process itself: every share must match BIASES."""
    n = 250
    spec = _spec(SHAPES_SPEC, n=n, batch=125)
    run_audit(spec, tmp_path, generator=render_generator(), progress=False)
    s = write_report(tmp_path, grids=False)
    assert s["complete"] and s["images"] == 4 * n
    covered = total = 0
    for shape in ("circle", "square", "triangle", "cross"):
        d = s["prompts"][f"a {shape}"]
        assert d["n"] == n and d["miss_rate"] == 0.0  # renders always show their shape
        assert d["hallucination"] == pytest.approx(3 / 4)  # In {shape}, Out {shape, colour, size, position}
        for attr in ("color", "size"):
            a, truth = d["attributes"][attr], attribute_distribution(shape, attr)
            assert a["n"] == n and a["unjudged"] == 0
            for v, t in truth.items():
                se = math.sqrt(t * (1 - t) / n)  # sampling error of a share of n renders
                assert abs(a["shares"][v] - t) < 3.5 * se, (shape, attr, v, a["shares"][v], t)
                covered += a["ci_low"][v] <= t <= a["ci_high"][v]
                total += 1
            biased = (shape, attr) in BIASES
            assert (a["p_value"] < 1e-6) == biased, (shape, attr, a["p_value"])  # bias found only where injected
    assert covered / total >= 0.9
    assert s["prompts"]["a circle"]["attributes"]["color"]["distribution_bias"] < 0.2  # one colour dominates
    cf = {c["attribute"]: c["cas"] for c in s["counterfactuals"]}
    circle, cross = (s["prompts"][p]["attributes"]["color"]["shares"] for p in ("a circle", "a cross"))
    assert cf["color"] == pytest.approx(cas(circle, cross)) and cf["color"] < 0.5 < cf["size"]


# ------------------------------------------------------------------------------------------------ runner
def test_resume_after_an_exception_loses_and_duplicates_nothing(tiny, tmp_path):
    xp = XAIPipeline(tiny("sd1"), batch_size=32)
    spec = _spec(TINY_SPEC, n=3, batch=2)  # 6 images in batches of 2
    gen = model_generator(xp, spec)
    calls = []

    def dies_on_third_batch(prompts, seeds):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return gen(prompts, seeds)

    with pytest.raises(KeyboardInterrupt):
        run_audit(spec, tmp_path / "a", xp=xp, generator=dies_on_third_batch, progress=False)
    assert len(load_rows(tmp_path / "a")) == 2  # the finished batch is kept
    res = run_audit(spec, tmp_path / "a", xp=xp, progress=False)
    assert res["done_now"] == 4 and res["rows"] == 6
    resumed = load_rows(tmp_path / "a")
    assert len({(r["prompt_index"], r["sample"]) for r in resumed}) == 6
    run_audit(spec, tmp_path / "b", xp=xp, progress=False)  # uninterrupted, same result
    assert _key(resumed) == _key(load_rows(tmp_path / "b"))
    assert run_audit(spec, tmp_path / "a", xp=xp, progress=False)["done_now"] == 0  # complete: nothing redone
    assert all((tmp_path / "a" / r["path"]).exists() for r in resumed)


def test_subprocess_killed_mid_run_resumes_to_the_exact_rows(tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SHAPES_SPEC.format(n=10, batch=3))
    code = textwrap.dedent(f"""
        import os, signal
        from diffusion_xai.audit import load_spec, render_generator, run_audit
        gen, calls = render_generator(), []
        def killed(prompts, seeds):
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return gen(prompts, seeds)
        run_audit(load_spec({str(spec_file)!r}), {str(tmp_path / 'a')!r}, generator=killed, progress=False)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    assert len(load_rows(tmp_path / "a")) == 12  # four batches of three finished before the kill
    assert main(["audit", "run", str(spec_file), "--out", str(tmp_path / "a"), "--model", "renders", "--quiet"]) == 0
    assert main(["audit", "run", str(spec_file), "--out", str(tmp_path / "b"), "--model", "renders", "--quiet"]) == 0
    a, b = load_rows(tmp_path / "a"), load_rows(tmp_path / "b")
    assert len(a) == 40 and _key(a) == _key(b)


def test_changed_spec_is_refused(tmp_path):
    run_audit(_spec(SHAPES_SPEC, n=2, batch=4), tmp_path, generator=render_generator(), progress=False)
    before = load_rows(tmp_path)
    with pytest.raises(SpecChangedError, match="images_per_prompt.*new --out"):
        run_audit(_spec(SHAPES_SPEC, n=3, batch=4), tmp_path, generator=render_generator(), progress=False)
    changed = SHAPES_SPEC.replace('"orange"]', '"orange", "pink"]')
    with pytest.raises(SpecChangedError, match="attributes"):
        run_audit(_spec(changed, n=2, batch=4), tmp_path, generator=render_generator(), progress=False)
    assert _key(load_rows(tmp_path)) == _key(before)


@pytest.mark.parametrize("edit, message, line", [
    (("seed = 0", "sed = 0"), "unknown key 'sed' in \\[generation\\]", 5),
    (('shape = ["circle", "square", "triangle", "cross"]', "shape = []"), "shape is empty", 10),
    (('"a {shape}"', '"a {shape} {color}"'), "slot\\(s\\) \\['color'\\] with no values", 8),
    (("[[counterfactuals]]", '[judge]\nkind = "gpt"\n[[counterfactuals]]'), "judge kind 'gpt' does not exist", 16),
    (("images_per_prompt = 2", "images_per_prompt = 0"), "images_per_prompt must be >= 1, got 0", 4),
])
def test_bad_specs_name_the_line_and_write_nothing(tmp_path, capsys, edit, message, line):
    text = SHAPES_SPEC.format(n=2, batch=4).replace(*edit)
    with pytest.raises(SpecError, match=message) as e:
        parse_spec(text, "spec.toml")
    assert f"spec.toml line {line}:" in str(e.value)
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert main(["audit", "run", str(f), "--out", str(tmp_path / "out"), "--model", "renders"]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_two_processes_write_exactly_the_rows_of_one(tiny, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(TINY_SPEC.format(n=3, batch=1))  # batch 1: an image never depends on its batch
    # one process, in this one (tiny("sd1") is the CLI's "tiny-random": same seed, same weights)
    run_audit(_spec(TINY_SPEC, n=3, batch=1), tmp_path / "one", xp=XAIPipeline(tiny("sd1"), default_steps=4),
              progress=False)
    args = ["audit", "run", str(spec_file), "--model", "tiny-random", "--device", "cpu", "--quiet"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusion_xai.audit.cli"]
    r = subprocess.run(launch + args + ["--out", str(tmp_path / "two")], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load_rows(tmp_path / "one"), load_rows(tmp_path / "two")
    assert len(two) == 6 and _key(one) == _key(two)
    assert {r["process"] for r in two} == {0, 1} and {r["process"] for r in one} == {0}
    assert sorted(r["labels"]["color"] for r in one) == sorted(r["labels"]["color"] for r in two)


# ------------------------------------------------------------------------------------------------ judges
def test_diffusion_judge_and_miss_test_against_direct_computation(tiny, tmp_path):
    xp = XAIPipeline(tiny("sd1"), batch_size=32)
    spec = _spec(TINY_SPEC, n=2, batch=4).__class__.from_dict(
        {**_spec(TINY_SPEC, n=2, batch=4).to_dict(), "miss_rate": True})
    images = model_generator(xp, spec)(["a circle", "a square"], [0, 1])
    judge = ModelJudge(xp, schedule="reference", stages=[[2, 1]], miss_timesteps=3)
    v = judge(images, ["a circle", "a square"], spec.attributes)
    direct = xp.classify(images, ["red", "blue"], schedule="reference", stages=[[2, 1]])
    assert [x.labels["color"] for x in v] == [["red", "blue"][int(i)] for i in direct.predictions]
    # miss: mean paired error with the prompt vs with "" over 3 timesteps, image by image
    x0 = xp.encode_image(images)
    noise = torch.randn((3, *x0.shape[1:]), generator=torch.Generator().manual_seed(0))
    ts = torch.linspace(xp.num_train_timesteps * 0.05, xp.num_train_timesteps * 0.95, 3).round().long()
    for i, p in enumerate(["a circle", "a square"]):
        x_t = xp.add_noise(x0[i:i + 1].expand(3, -1, -1, -1), noise, ts)
        e_p = ((xp.predict_noise(x_t, ts, xp.encode_prompt(p)) - noise) ** 2).mean()
        e_0 = ((xp.predict_noise(x_t, ts, xp.encode_prompt("")) - noise) ** 2).mean()
        assert v[i].miss == bool(e_p > e_0)
    assert prefers_empty(xp, images, ["a circle", "a square"], 3) == [x.miss for x in v]
    # from_prompt: every image among its own prompt with the value inserted ("a red circle", "a blue circle")
    own = ModelJudge(xp, schedule="reference", stages=[[2, 1]], from_prompt=True)
    v = own(images, ["a circle", "a square"], spec.attributes, miss_rate=False)
    for i, shape in enumerate(["circle", "square"]):
        d = xp.classify(images[i:i + 1], [f"a red {shape}", f"a blue {shape}"], schedule="reference", stages=[[2, 1]])
        assert v[i].labels["color"] == ["red", "blue"][int(d.predictions[0])] and v[i].miss is None


def test_clip_judge_matches_the_model_forward(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from diffusion_xai.testing import make_tokenizer

    tok = make_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    judge = CLIPJudge.from_pretrained(tmp_path / "clip")
    images = render_generator()(["a circle", "a red square", "a cross"], [0, 1, 2])
    texts = ["a red circle", "a blue circle"]
    p = judge.probs(images, ["red", "blue"], ["a {} circle"])
    import numpy as np

    px = np.stack([np.asarray(im.resize((32, 32)), np.float32) / 255 for im in images])
    px = (torch.from_numpy(px).permute(0, 3, 1, 2) - judge.mean) / judge.std
    t = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = judge.model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px).logits_per_image
    assert torch.allclose(p, ref.softmax(-1).double(), atol=1e-5)
    spec = parse_spec('[generation]\nimages_per_prompt = 1\n[prompts]\nlist = ["a circle", "a red square", "a cross"]\n'
                      '[attributes.color]\nvalues = ["red", "blue"]\ntemplates = ["a {} circle"]\n'
                      f'[judge]\nkind = "clip"\ncheckpoint = "{tmp_path / "clip"}"\n', "clip.toml")
    from diffusion_xai.audit import make_judge

    v = make_judge(spec)(images, spec.prompts, spec.attributes)
    assert [x.labels["color"] for x in v] == [["red", "blue"][int(i)] for i in ref.argmax(1)]
    assert all(isinstance(x.miss, bool) for x in v)


# ------------------------------------------------------------------------------------------------ report
def test_report_files_hold_the_right_numbers(tmp_path, capsys):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SHAPES_SPEC.format(n=20, batch=8))
    out = tmp_path / "run"
    assert main(["audit", "run", str(spec_file), "--out", str(out), "--model", "renders", "--quiet"]) == 0
    assert main(["audit", "report", str(out)]) == 0
    rows = load_rows(out)
    rep = json.loads((out / "report.json").read_text())
    circle = [r["labels"]["color"] for r in rows if r["prompt"] == "a circle"]
    k = circle.count("red")
    d = rep["prompts"]["a circle"]["attributes"]["color"]
    assert d["counts"]["red"] == k and d["shares"]["red"] == k / 20
    assert (d["ci_low"]["red"], d["ci_high"]["red"]) == pytest.approx(wilson_interval(k, 20, continuity=True))
    assert d["tv"] == pytest.approx(0.5 * sum(abs(d["shares"][v] - 1 / 6) for v in d["shares"]))
    with (out / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4 * (6 + 2)
    red = next(r for r in table if r["prompt"] == "a circle" and r["value"] == "red")
    assert int(red["count"]) == k and float(red["ci_high"]) == pytest.approx(wilson_interval(k, 20, continuity=True)[1])
    html = (out / "report.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 2 + 4 * 2  # two charts, a grid per prompt x attribute
    assert "a triangle" in html and "UCE Delta" in html


def test_pid_pairs_are_stored_per_value_and_seed(tiny, tmp_path):
    xp = XAIPipeline(tiny("sd1"), batch_size=32)
    text = TINY_SPEC.format(n=1, batch=2) + '[[pid]]\nconcept = "circle"\nattribute = "color"\nseeds = 1\nnum_samples = 2\n'
    spec = parse_spec(text, "pid.toml")
    run_audit(spec, tmp_path, xp=xp, progress=False)
    pid_rows = load_pid_rows(tmp_path)
    assert [(r["value"], r["seed"], r["prompt"]) for r in pid_rows] == [("blue", 0, "a blue circle"),
                                                                         ("red", 0, "a red circle")]
    direct = xp.pid("a red circle", "red", "circle", seed=0, num_samples=2, num_inference_steps=2, guidance_scale=2.0,
                    height=32, width=32, progress=False)
    assert pid_rows[1]["scalars"]["R"] == pytest.approx(direct.R, rel=1e-5)
    s = write_report(tmp_path, grids=False)
    assert [r["value"] for r in s["pid"]] == ["red", "blue"] and s["pid"][0]["R"] == pytest.approx(direct.R, rel=1e-5)


# ------------------------------------------------------------------------------------------------ the example loop
def test_audit_explain_fix_example_moves_the_circle_colours_to_uniform(tmp_path):
    """examples/audit_explain_fix.py on the embedded model: the first audit finds the injected bias (circles
    painted red far above the uniform 1/6) and the debias edit brings the re-audit near uniform."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_explain_fix", ROOT / "examples" / "audit_explain_fix.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--images", "32", "--pid-samples", "4", "--out", str(tmp_path)])
    b, a = out["before"], out["after"]
    uniform = 1 / 6
    assert b["shares"]["red"] > 0.5 and b["ci_low"]["red"] > uniform and b["tv"] > 0.5, b
    assert a["shares"]["red"] < b["shares"]["red"] / 2 and a["tv"] < b["tv"] / 2, (b, a)
    assert set(out["redundancy"]) == set(b["shares"])
