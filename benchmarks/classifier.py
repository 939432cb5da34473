"""Diffusion Classifier benchmark: reference vs fast schedule on held-out ShapesWorld renders.

    python benchmarks/classifier.py [--model PATH] [--quick] [--images N] [--save-calibration]

Images are the generator's own renders (``build_scene`` / ``sample_scene`` with seeds far from the
training seeds), not model samples. Tasks:
- colour: one object, 6 colours; prompts "a {colour} {shape}" (the true shape is given);
- shape: one object, 4 shapes; prompts "a {colour} {shape}" (the true colour is given);
- position: one object, 5 positions; prompts "a {colour} {shape} on the {position}" ("in the center");
- caption: a random 1-3 object scene; 20 candidate captions (the true one + 19 of other scenes).
For every image both schedules run with the same seed (hence the same noise). Reported side by side:
accuracy, UNet evaluations per image and wall time per image; then the calibration (a temperature
fitted on the first half of the images, ECE on the second half) and the classifier's UNet throughput
against a plain batched UNet call. Writes benchmarks/results/classifier.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.classifier import (  # noqa: E402
    classify,
    expected_calibration_error,
    fit_temperature,
    save_calibration,
    softmax_probs,
)
from diffusion_xai.shapesworld import (  # noqa: E402
    COLORS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_DIR,
    POSITIONS,
    SHAPES,
    SIZES,
    load_shapesworld_pipeline,
    sample_scene,
)
from diffusion_xai.shapesworld.scene import build_scene  # noqa: E402

HELD_OUT_SEED = 10**9  # training encodes scenes 0..num_latents-1


def position_prompt(color: str, shape: str, position: str) -> str:
    return f"a {color} {shape} {'in' if position == 'center' else 'on'} the {position}"


def make_task(task: str, n: int, seed: int) -> list[dict]:
    """``n`` held-out items of a task: image (64, 64, 3) uint8, candidate prompts, the true index."""
    rng = np.random.default_rng(seed + {"color": 1, "shape": 2, "position": 3, "caption": 4}[task])
    items = []
    for i in range(n):
        if task == "caption":
            scene = sample_scene(HELD_OUT_SEED + 10_000 * 4 + i)
            others: list[str] = []
            j = 0
            while len(others) < 19:
                c = sample_scene(HELD_OUT_SEED + 10_000 * 5 + 19 * i + j).caption
                j += 1
                if c != scene.caption and c not in others:
                    others.append(c)
            prompts = others[:]
            label = int(rng.integers(20))
            prompts.insert(label, scene.caption)
            items.append({"image": scene.image, "prompts": prompts, "label": label, "values": prompts})
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
        scene = build_scene([(shape, color, size, position, True, False)], mention_position=False,
                            rng=np.random.default_rng(HELD_OUT_SEED + i))
        if task == "color":
            values, prompts = list(COLORS), [f"a {c} {shape}" for c in COLORS]
            label = values.index(color)
        elif task == "shape":
            values, prompts = list(SHAPES), [f"a {color} {s}" for s in SHAPES]
            label = values.index(shape)
        else:
            values, prompts = list(POSITIONS), [position_prompt(color, shape, p) for p in POSITIONS]
            label = values.index(position)
        items.append({"image": scene.image, "prompts": prompts, "label": label, "values": values})
    return items


def run_task(xp, items: list[dict], schedule: str, seed: int, confidence: float) -> dict:
    preds, evals, secs, deltas = [], [], [], []
    for it in items:
        res = classify(xp, it["image"], it["prompts"], schedule=schedule, seed=seed, confidence=confidence,
                       temperature=1.0, progress=False)
        preds.append(int(res.predictions[0]))
        evals.append(res.unet_evals[0])
        secs.append(res.seconds[0])
        deltas.append(res.deltas[0])
    labels = [it["label"] for it in items]
    return {"preds": preds, "labels": labels, "evals": evals, "secs": secs, "deltas": deltas,
            "accuracy": float(np.mean([p == y for p, y in zip(preds, labels)]))}


def throughput(xp, seed: int) -> dict:
    """Seconds for the reference schedule on one colour image vs plain batched UNet calls of as many rows."""
    it = make_task("color", 1, seed)[0]
    res = classify(xp, it["image"], it["prompts"], schedule="reference", seed=seed, progress=False)
    n = res.unet_evals[0]
    emb = xp.encode_prompt(it["prompts"][0]).embeds.to(xp.device, xp.dtype)
    bs = xp.batch_size
    x = torch.randn(bs, *res.noise.shape[2:], device=xp.device, dtype=xp.dtype)
    tt = torch.full((bs,), 500, device=xp.device)
    enc = emb.expand(bs, -1, -1)

    def plain():
        with torch.no_grad():
            for _ in range(0, n, bs):
                xp.unet(x, tt, encoder_hidden_states=enc)
        if xp.device.type == "cuda":
            torch.cuda.synchronize()

    def clf():
        classify(xp, it["image"], it["prompts"], schedule="reference", seed=seed, progress=False)
        if xp.device.type == "cuda":
            torch.cuda.synchronize()

    reps = 1 if xp.device.type == "cpu" else 3
    t = interleaved({"plain": plain, "classifier": clf}, reps=reps, warmup=1)
    plain_rows = -(-n // bs) * bs
    return {"unet_evals": n, "batch_size": bs, "plain_evals_per_s": plain_rows / t["plain"],
            "classifier_evals_per_s": n / t["classifier"], "ratio": (n / t["classifier"]) / (plain_rows / t["plain"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="ShapesWorld pipeline folder (default: the embedded model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a few images per task (a smoke run)")
    ap.add_argument("--images", type=int, default=None, help="images per task (default 100, quick 3)")
    ap.add_argument("--tasks", default="color,shape,position,caption")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--confidence", type=float, default=0.99, help="fast schedule's elimination confidence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="classifier", help="name of the JSON written")
    ap.add_argument("--save-calibration", action="store_true",
                    help="store the fitted temperature in the model folder (classifier_calibration.json)")
    a = ap.parse_args()
    n = a.images or (3 if a.quick else 100)
    folder = Path(a.model) if a.model else MODEL_DIR
    pipe = load_shapesworld_pipeline(folder).to(a.device)
    xp = XAIPipeline(pipe, batch_size=a.batch_size, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)

    rows, per_task, all_runs = [], {}, {"reference": [], "fast": []}
    for task in a.tasks.split(","):
        items = make_task(task, n, a.seed)
        t0 = time.perf_counter()
        ref = run_task(xp, items, "reference", a.seed, a.confidence)
        fast = run_task(xp, items, "fast", a.seed, a.confidence)
        agree = float(np.mean([p == q for p, q in zip(ref["preds"], fast["preds"])]))
        row = {"task": task, "classes": len(items[0]["prompts"]), "images": n,
               "ref_acc": ref["accuracy"], "fast_acc": fast["accuracy"], "agree": agree,
               "ref_evals": float(np.mean(ref["evals"])), "fast_evals": float(np.mean(fast["evals"])),
               "evals_ratio": float(np.mean(fast["evals"]) / np.mean(ref["evals"])),
               "ref_s": float(np.mean(ref["secs"])), "fast_s": float(np.mean(fast["secs"]))}
        rows.append(row)
        per_task[task] = {**row, "seconds_total": time.perf_counter() - t0,
                          "reference_preds": ref["preds"], "fast_preds": fast["preds"], "labels": ref["labels"],
                          "reference_evals": ref["evals"], "fast_evals": fast["evals"]}
        all_runs["reference"].append(ref)
        all_runs["fast"].append(fast)
        print(table([row], f"task {task}"), flush=True)
    print()
    print(table(rows, f"Diffusion Classifier on held-out ShapesWorld renders ({a.device}, seed {a.seed})"))

    # calibration: fit on the first half of every task's images (fast schedule), ECE on the second half
    half = max(1, n // 2)
    fit_d, fit_y = [], []
    for r in all_runs["fast"]:
        for d, y in zip(r["deltas"][:half], r["labels"][:half]):
            fit_d.append(d)
            fit_y.append(y)
    # tasks have different class counts: fit on padded rows (padding = +inf delta = zero probability)
    K = max(len(d) for d in fit_d)

    def pad(ds):
        return torch.stack([torch.cat([d, torch.full((K - len(d),), float("inf"), dtype=d.dtype)]) for d in ds])

    T = fit_temperature(pad(fit_d), fit_y)
    cal_rows = []
    for sched in ("reference", "fast"):
        for task, r in zip(a.tasks.split(","), all_runs[sched]):
            ds, ys = r["deltas"][half:], r["labels"][half:]
            if not ds:
                continue
            d = torch.stack(ds)
            cal_rows.append({"schedule": sched, "task": task, "test_images": len(ys),
                             "ece_raw": expected_calibration_error(softmax_probs(d, 1.0), ys),
                             "ece_calibrated": expected_calibration_error(softmax_probs(d, T), ys),
                             "mean_conf": float(softmax_probs(d, T).max(-1).values.mean()),
                             "accuracy": float(np.mean([int(dd.argmin()) == y for dd, y in zip(ds, ys)]))})
    calib = {"temperature": T, "fitted_on": f"fast schedule, first {half} images of every task", "loss": "l2",
             "rows": cal_rows}
    if cal_rows:
        print()
        print(table(cal_rows, f"calibration: temperature {T:.4g} fitted on the first half, ECE on the second half"))
    if a.save_calibration:
        ece = float(np.mean([r["ece_calibrated"] for r in cal_rows])) if cal_rows else None
        path = save_calibration(folder, "l2", T, ece=ece, fitted_on=calib["fitted_on"], images_per_task=n)
        print(f"stored the temperature in {path}")

    tp = throughput(xp, a.seed)
    print()
    print(table([tp], "UNet throughput: classifier (reference schedule) vs plain batched UNet calls"))
    out = write_json(a.name, {"model": str(folder), "device": a.device, "quick": a.quick, "images_per_task": n,
                                    "seed": a.seed, "confidence": a.confidence, "batch_size": a.batch_size,
                                    "tasks": per_task, "calibration": calib, "throughput": tp,
                                    "targets": {"reference_color_shape_acc": ">= 0.90",
                                                "fast": "accuracy within 0.01 of reference at <= 1/3 UNet evals",
                                                "throughput_ratio": ">= 0.9"}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
