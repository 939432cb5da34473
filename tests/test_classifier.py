"""Diffusion Classifier: reference parity with a loop-by-loop computation, shared noise, the fast
schedule's elimination, calibration, bad input, CLI and the 2-process dataset run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_xai import XAIPipeline
from diffusion_xai.classifier import (
    ClassificationResult,
    DiffusionJudge,
    _run_fast,
    classify,
    expected_calibration_error,
    fit_temperature,
    reference_evals,
    stage_indices,
    stratified_order,
    timestep_grid,
)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a red circle", "a blue square", "a green cross", "a dog"]
STAGES = ((4, 2), (8, 1))


def _xp(tiny, kind="sd1"):
    return XAIPipeline(tiny(kind), batch_size=32)


def _images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ the plan
def test_reference_grid_stages_and_eval_counts():
    grid = timestep_grid(1000, 500)
    assert grid[:3] == [1, 3, 5] and grid[-1] == 999 and len(grid) == 500
    # stage of 50 on the 500 grid: every 10th position starting at 5 -> timesteps 11, 31, ...
    first = stage_indices(500, 50)
    assert [grid[m] for m in first[:3]] == [11, 31, 51] and len(first) == 50
    assert len(stage_indices(500, 500, first)) == 450
    assert timestep_grid(1000, 250)[:2] == [2, 6]
    # the published costs
    assert reference_evals(10) == 10 * 50 + 5 * 450 == 2750
    assert reference_evals(37) == 37 * 25 + 5 * 225 == 2050
    assert reference_evals(100) == 5550  # "~5,600"
    order = stratified_order(500)
    assert sorted(order) == list(range(500)) and order[:4] == [0, 256, 128, 384]


# ------------------------------------------------------------------------------------------ parity
def _direct_reference(pipe, image: np.ndarray, prompts, stages, noise, loss, trials):
    """The formula, loop by loop, straight on the diffusers modules (no XAIPipeline)."""
    T = pipe.scheduler.config.num_train_timesteps
    M = max(n for n, _ in stages)
    grid = list(range(T // M // 2, T, T // M))[:M]
    abar = pipe.scheduler.alphas_cumprod.double()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    x0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
    errors = {}  # (class, t, trial) -> error
    remaining, evaluated = list(range(len(prompts))), []
    for n, keep in stages:
        step = len(grid) // n
        current = [t for t in grid[step // 2::step][:n] if t not in evaluated]
        for c in remaining:
            for t in current:
                a = float(abar[t])
                for r in range(trials):
                    eps = noise[grid.index(t), r][None]
                    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
                    out = pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=text[c:c + 1]).sample
                    if v_pred:
                        out = math.sqrt(1 - a) * x_t + math.sqrt(a) * out
                    if loss == "l2":
                        e = ((eps - out) ** 2).mean()
                    elif loss == "l1":
                        e = (eps - out).abs().mean()
                    else:
                        e = F.huber_loss(out, eps)
                    errors[(c, t, r)] = float(e)
        evaluated += current
        score = {c: -np.mean([errors[(c, t, r)] for t in evaluated for r in range(trials)]) for c in remaining}
        remaining = sorted(remaining, key=lambda c: -score[c])[:keep]
    return errors, remaining[0], grid


@pytest.mark.parametrize("kind,loss", [("sd1", "l2"), ("sd2v", "l1"), ("sd1", "huber")])
@torch.no_grad()
def test_reference_parity_with_loop_by_loop_formula(tiny, kind, loss):
    xp = _xp(tiny, kind)
    imgs = _images(2)
    trials = 2
    res = classify(xp, imgs, CLASSES, schedule="reference", stages=STAGES, loss=loss, trials=trials, seed=5,
                   progress=False)
    assert res.noise.shape == (8, trials, 4, 8, 8)
    for i in range(2):
        errors, pred, grid = _direct_reference(xp.pipe, imgs[i], CLASSES, STAGES, res.noise, loss, trials)
        assert res.grid.tolist() == grid
        got = {(int(c), grid[m], int(r)): float(res.sample_errors[i, c, m, r])
               for c, m, r in zip(*torch.nonzero(~res.sample_errors[i].isnan(), as_tuple=True))}
        assert got.keys() == errors.keys()
        for k, v in errors.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6)
        assert int(res.predictions[i]) == pred
        assert res.unet_evals[i] == len(errors) == (4 * 4 + 2 * 4) * trials
    # reported statistics are the formulas on the raw samples
    e = res.sample_errors[0, int(res.predictions[0])].flatten()
    assert float(res.errors[0, int(res.predictions[0])]) == pytest.approx(float(e.mean()))
    assert float(res.stderr[0, int(res.predictions[0])]) == pytest.approx(float(e.std() / math.sqrt(len(e))))
    assert sorted(res.n_samples[0].tolist()) == [8, 8, 16, 16]  # 4 timesteps x 2 trials, then 2 kept for 4 more


def test_sdxl_runs_through_predict_noise(tiny):
    xp = _xp(tiny, "sdxl")
    res = classify(xp, _images(1), CLASSES[:2], schedule="reference", stages=((2, 1),), progress=False)
    emb = xp.encode_prompt(CLASSES[:2])
    x0 = xp.encode_image(_images(1))
    m, t = 0, int(res.grid[0])
    eps = res.noise[m, 0][None]
    for c in range(2):
        out = xp.predict_noise(xp.add_noise(x0, eps, t), t, emb.index([c]))
        assert float(res.sample_errors[0, c, m, 0]) == pytest.approx(float(((out - eps) ** 2).mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------ shared noise, seeds
def test_noise_is_shared_by_classes_and_images(tiny):
    xp = _xp(tiny)
    img = _images(1)
    # two prompts that tokenise identically: the same noise must give bit-identical errors
    same = ["a red circle", "a  red circle", "a dog"]
    assert torch.equal(xp.encode_prompt(same[0]).embeds, xp.encode_prompt(same[1]).embeds)
    batch = np.concatenate([img, img])
    for schedule in ("reference", "fast"):
        res = classify(xp, batch, same, schedule=schedule, stages=STAGES, progress=False)
        a, b = res.sample_errors[0, 0], res.sample_errors[0, 1]
        both = ~a.isnan() & ~b.isnan()
        assert both.sum() >= 4 and torch.equal(a[both], b[both])
        # the same image twice in a batch: the same noise, the same errors
        assert torch.equal(res.sample_errors[0].nan_to_num(-1), res.sample_errors[1].nan_to_num(-1))
    # fast and reference see the same noise at the same (timestep, trial)
    fast = classify(xp, img, CLASSES, stages=STAGES, progress=False, confidence=0.5)
    ref = classify(xp, img, CLASSES, schedule="reference", stages=STAGES, progress=False)
    assert torch.equal(fast.noise, ref.noise)
    both = ~fast.sample_errors.isnan() & ~ref.sample_errors.isnan()
    assert both.any()
    assert torch.allclose(fast.sample_errors[both], ref.sample_errors[both], rtol=1e-5)


def test_seeds_reproducible(tiny):
    xp = _xp(tiny)
    a = classify(xp, _images(1), CLASSES, schedule="reference", stages=STAGES, seed=3, progress=False)
    b = classify(xp, _images(1), CLASSES, schedule="reference", stages=STAGES, seed=3, progress=False)
    c = classify(xp, _images(1), CLASSES, schedule="reference", stages=STAGES, seed=4, progress=False)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.sample_errors.nan_to_num(-1), b.sample_errors.nan_to_num(-1))
    assert not torch.equal(a.noise, c.noise)
    assert not torch.allclose(a.errors, c.errors)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a.noise, torch.randn(a.noise.shape, generator=g))


# ------------------------------------------------------------------------------------------ fast schedule
class _FakeEvaluator:
    """err(c, t, eps) = shape(t) + offset_c + per-(t, trial) noise shared by classes + small class noise."""

    def __init__(self, offsets, M, trials, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.tensor(offsets, dtype=torch.float64)
        self.base = torch.linspace(0.05, 1.0, M, dtype=torch.float64)[:, None] + 0.3 * torch.rand(M, trials, generator=g,
                                                                                                     dtype=torch.float64)
        self.jitter = 0.004 * torch.randn(len(offsets), M, trials, generator=g, dtype=torch.float64)
        self.rows = 0

    def __call__(self, x0, c, m, r):
        self.rows += len(c)
        return self.base[m, r] + self.offsets[c] + self.jitter[c, m, r]


def test_fast_eliminates_by_paired_differences():
    K, M = 10, 500
    offsets = [0.0] + [0.002 * (k + 1) for k in range(K - 1)]  # class 0 is best; shared base is 100x larger
    ev = _FakeEvaluator(offsets, M, 1)
    errs = torch.full((K, M, 1), float("nan"), dtype=torch.float64)
    _run_fast(ev, None, K, M, 1, errs, z=3.0, min_timesteps=8, round_rows=32, max_timesteps=M)
    n = (~errs.isnan()).flatten(1).sum(-1)
    assert n[0] == n.max() and (n[2:] == 8).all()  # the clearly worse ones go after the first round
    # the full reference would cost 2,750 rows; paired elimination needs a small fraction
    assert ev.rows < 2750 / 3
    res = ClassificationResult(errs[None], torch.arange(M), torch.zeros(M, 1, 1, 1, 1), [str(k) for k in range(K)],
                               [str(k) for k in range(K)])
    assert int(res.predictions[0]) == 0
    # an unpaired comparison could not separate them: the errors' own standard error is far larger than the gap
    assert float(res.stderr[0, 0]) > 10 * offsets[1]
    assert (res.deltas[0, 1:] > 0).all()


@pytest.mark.parametrize("best", [3, 9])
def test_fast_prediction_is_the_survivor_when_the_last_round_drops_several(best):
    # the true class is not index 0 and the last round eliminates several classes at once, so several
    # classes end with the same sample count: the answer must still be the survivor (lowest shared error)
    K, M = 10, 500
    offsets = [0.004] * K
    offsets[best] = 0.0
    ev = _FakeEvaluator(offsets, M, 1, seed=1)
    errs = torch.full((K, M, 1), float("nan"), dtype=torch.float64)
    _run_fast(ev, None, K, M, 1, errs, z=3.0, min_timesteps=8, round_rows=32, max_timesteps=M)
    n = (~errs.isnan()).flatten(1).sum(-1)
    assert int((n == n.max()).sum()) > 1  # a tie in sample counts is the case under test
    res = ClassificationResult(errs[None], torch.arange(M), torch.zeros(M, 1, 1, 1, 1), [str(k) for k in range(K)],
                               [str(k) for k in range(K)])
    assert int(res.predictions[0]) == best
    assert float(res.deltas[0, best]) == 0 and (torch.cat([res.deltas[0, :best], res.deltas[0, best + 1:]]) > 0).all()


def test_fast_keeps_all_classes_when_they_tie():
    K, M = 3, 64
    ev = _FakeEvaluator([0.0, 0.0, 0.0], M, 1)
    ev.jitter.zero_()
    errs = torch.full((K, M, 1), float("nan"), dtype=torch.float64)
    _run_fast(ev, None, K, M, 1, errs, z=3.0, min_timesteps=8, round_rows=12, max_timesteps=M)
    assert ((~errs.isnan()).sum() == K * M) and ev.rows == K * M
    # with a budget (default: the reference cost) it stops there, on whole timesteps for all classes
    ev.rows = 0
    errs = torch.full((K, M, 1), float("nan"), dtype=torch.float64)
    _run_fast(ev, None, K, M, 1, errs, z=3.0, min_timesteps=8, round_rows=12, max_timesteps=M, max_evals=100)
    assert ev.rows == 99 and (~errs.isnan()).flatten(1).sum(-1).tolist() == [33, 33, 33]


def test_fast_on_a_model_never_costs_more_than_the_grid(tiny):
    xp = _xp(tiny)
    res = classify(xp, _images(1), CLASSES, stages=STAGES, progress=False)
    assert res.schedule == "fast" and 0 < res.unet_evals[0] <= reference_evals(4, STAGES) == 24
    assert res.unet_evals[0] == int(res.n_samples.sum())
    with pytest.raises(ValueError, match="max_evals must be >= 8"):
        classify(xp, _images(1), CLASSES, stages=STAGES, max_evals=5)


# ------------------------------------------------------------------------------------------ calibration
def test_fit_temperature_recovers_the_true_temperature():
    g = torch.Generator().manual_seed(0)
    T0, N, K = 0.02, 4000, 5
    deltas = torch.rand(N, K, generator=g, dtype=torch.float64) * 0.08
    p = torch.softmax(-deltas / T0, -1)
    labels = torch.multinomial(p, 1, generator=g).flatten()
    T = fit_temperature(deltas, labels)
    assert T == pytest.approx(T0, rel=0.1)
    assert expected_calibration_error(torch.softmax(-deltas / T, -1), labels) < 0.03
    assert expected_calibration_error(torch.softmax(-deltas / 1.0, -1), labels) > 0.2  # flat, uncalibrated


def test_ece_known_answer():
    probs = torch.tensor([[0.9, 0.1]] * 10, dtype=torch.float64)
    assert expected_calibration_error(probs, [0] * 10) == pytest.approx(0.1)
    assert expected_calibration_error(probs, [0] * 9 + [1]) == pytest.approx(0.0, abs=1e-12)


def test_probabilities_use_temperature_and_stored_calibration(tiny, tmp_path):
    xp = _xp(tiny)
    res = classify(xp, _images(1), CLASSES, schedule="reference", stages=STAGES, progress=False)
    assert not res.calibrated and res.temperature == 1.0
    sharp = res.with_temperature(1e-4)
    assert torch.allclose(sharp.probs, torch.softmax(-res.deltas / 1e-4, -1).double())
    assert int(sharp.probs[0].argmax()) == int(res.predictions[0]) and float(sharp.probs.sum()) == pytest.approx(1)
    from diffusion_xai.classifier import load_calibration, save_calibration

    save_calibration(tmp_path, "l2", 0.01, ece=0.05)
    old = xp.pipe.config.get("_name_or_path")
    xp.pipe.register_to_config(_name_or_path=str(tmp_path))
    try:
        assert load_calibration(xp, "l2") == 0.01 and load_calibration(xp, "l1") is None
        cal = classify(xp, _images(1), CLASSES, schedule="reference", stages=STAGES, progress=False)
        assert cal.calibrated and cal.temperature == 0.01
    finally:
        xp.pipe.register_to_config(_name_or_path=old)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors(tiny):
    xp = _xp(tiny)
    img = _images(1)
    with pytest.raises(ValueError, match="empty class list"):
        classify(xp, img, [])
    with pytest.raises(ValueError, match="duplicate classes: 'a dog'"):
        classify(xp, img, ["a dog", "a cat", "a dog"])
    with pytest.raises(ValueError, match="at least two classes.*'a dog'"):
        classify(xp, img, ["a dog"])
    with pytest.raises(ValueError, match="single string"):
        classify(xp, img, "a dog,a cat")
    with pytest.raises(ValueError, match="mode 'L'"):
        classify(xp, Image.new("L", (16, 16)), CLASSES)
    with pytest.raises(ValueError, match="15x16 is not allowed.*multiples of 2"):
        classify(xp, np.zeros((16, 15, 3), np.uint8), CLASSES)
    long = "a " + "red " * 80 + "circle"
    with pytest.raises(ValueError, match=r"is 84 tokens long; the text encoder takes at most 77"):
        classify(xp, img, ["a dog", long])
    with pytest.raises(ValueError, match="unknown schedule 'slow'; allowed: fast, reference"):
        classify(xp, img, CLASSES, schedule="slow")
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        classify(xp, img, CLASSES, loss="l3")
    with pytest.raises(ValueError, match="template must be a string with one"):
        classify(xp, img, ["red", "blue"], template="a circle")
    with pytest.raises(ValueError, match="stage"):
        classify(xp, img, CLASSES, stages=((0, 1),))
    with pytest.raises(ValueError, match="seed"):
        classify(xp, img, CLASSES, seed=-1)
    assert xp.unet_evals == 0  # nothing ran


# ------------------------------------------------------------------------------------------ result, judge
def test_result_save_load_to_dict_plot_topk(tiny, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    xp = _xp(tiny)
    res = classify(xp, _images(2), ["red", "blue", "green"], template="a {} circle", schedule="reference",
                   stages=STAGES, progress=False)
    assert res.prompts == ["a red circle", "a blue circle", "a green circle"]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["images"][0]["prediction"] == res.labels[0] and len(d["images"]) == 2
    assert d["images"][1]["timesteps"] == res.timesteps(1) == res.grid.tolist()
    top = res.topk(2, image=0)
    assert top[0][0] == res.labels[0] and top[0][1] >= top[1][1]
    back = ClassificationResult.load(res.save(tmp_path / "r"))
    assert torch.equal(back.sample_errors.nan_to_num(-1), res.sample_errors.nan_to_num(-1))
    assert torch.equal(back.noise, res.noise) and back.to_dict() == res.to_dict()
    assert res.accuracy(res.labels) == 1.0
    fig = res.plot(0, image_pil=Image.fromarray(_images(1)[0]))
    assert len(fig.axes) == 3


def test_judge_sums_prompt_probabilities(tiny):
    xp = _xp(tiny)
    judge = DiffusionJudge(xp, schedule="reference", stages=STAGES, temperature=1e-4)
    j = judge.judge(_images(2), "color", ["red", "blue"], templates=["a {} circle", "a {} square"], progress=False)
    res = j.classification
    assert res.prompts == ["a red circle", "a red square", "a blue circle", "a blue square"]
    assert torch.allclose(j.probs[:, 0], res.probs[:, 0] + res.probs[:, 1])
    assert torch.allclose(j.probs.sum(1), torch.ones(2, dtype=torch.float64))
    assert j.labels == [["red", "red", "blue", "blue"][int(p)] for p in res.predictions]


def test_judge_default_templates_follow_the_shapesworld_grammar():
    from diffusion_xai.classifier import default_templates

    pos = [t("center") for t in default_templates("position")] + [t("left") for t in default_templates("position")]
    assert pos[0] == "a circle in the center" and "a cross on the left" in pos
    assert [t.format("red") for t in default_templates("color")] == [
        "a red circle", "a red square", "a red triangle", "a red cross"]
    assert default_templates("shape") == ["a {}"] and default_templates("mood") == ["{}"]


# ------------------------------------------------------------------------------------------ CLI
def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _write_dataset(folder: Path) -> None:
    imgs = _images(5, seed=1)
    for i, im in enumerate(imgs):
        d = folder / ("red" if i % 2 else "blue")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")


def test_cli_classify_and_dataset_in_two_processes(tmp_path, capsys):
    from diffusion_xai.classify_cli import main

    img = tmp_path / "x.png"
    Image.fromarray(_images(1)[0]).convert("RGBA").save(img)  # alpha is converted by the CLI
    (tmp_path / "classes.txt").write_text("red\n\nblue\ngreen\n")
    opts = ["--model", "tiny-random", "--schedule", "reference", "--stages", "4:1", "--template", "a {} circle"]
    assert main(["classify", str(img), "--classes", f"@{tmp_path / 'classes.txt'}", "--out",
                 str(tmp_path / "c.json")] + opts) == 0
    d = json.loads(capsys.readouterr().out)
    assert d == json.loads((tmp_path / "c.json").read_text())
    assert d["classes"] == ["red", "blue", "green"] and d["prompts"][0] == "a red circle"
    assert d["prediction"] in ("red", "blue", "green") and d["unet_evals"] == 12
    assert sum(d["probs"].values()) == pytest.approx(1.0)
    assert main(["classify", str(img), "--classes", "red"] + opts) == 2
    assert "at least two classes" in capsys.readouterr().err

    data = tmp_path / "data"
    _write_dataset(data)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["classify-dataset", str(data)] + opts + ["--chunk", "2"]
    assert main(args + ["--out", str(one)]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "diffusion_xai.classify_cli"]
    r2 = subprocess.run(launch + args + ["--out", str(two)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s1, s2 = (json.loads((p / "summary.json").read_text()) for p in (one, two))
    p1, p2 = (json.loads((p / "per_image.json").read_text()) for p in (one, two))
    assert s1["processes"] == 1 and s2["processes"] == 2
    assert s1["images"] == s2["images"] == 5 and s1["classes"] == ["blue", "red"]
    assert s1["confusion"] == s2["confusion"] and s1["accuracy"] == s2["accuracy"]
    assert sum(map(sum, s1["confusion"])) == 5
    assert s1["accuracy"] == sum(r["correct"] for r in p1) / 5
    assert [r["image"] for r in p1] == [r["image"] for r in p2]
    for a, b in zip(p1, p2):
        assert a["label"] == b["label"] and a["prediction"] == b["prediction"]
        assert a["errors"] == pytest.approx(b["errors"], rel=1e-6)


def test_dataset_loading_folder_and_csv(tmp_path):
    from diffusion_xai.classify_cli import load_dataset, parse_classes, parse_stages

    _write_dataset(tmp_path / "d")
    items = load_dataset(tmp_path / "d")
    assert [lab for _, lab in items] == ["blue", "blue", "blue", "red", "red"]
    (tmp_path / "d.csv").write_text("image,label\nd/red/1.png,red\nd/blue/0.png,blue\n")
    rows = load_dataset(tmp_path / "d.csv")
    assert rows == [(str(tmp_path / "d/red/1.png"), "red"), (str(tmp_path / "d/blue/0.png"), "blue")]
    (tmp_path / "bad.csv").write_text("path,class\nx.png,red\n")
    with pytest.raises(ValueError, match="columns 'image' and 'label'"):
        load_dataset(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_dataset(tmp_path / "missing")
    assert parse_classes(" red, blue ,") == ["red", "blue"] and parse_stages("50:5,500:1") == [(50, 5), (500, 1)]
    with pytest.raises(ValueError, match="timesteps:keep"):
        parse_stages("50-5")
