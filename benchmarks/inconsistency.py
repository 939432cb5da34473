"""D-TIIL benchmark: text-image inconsistency localisation on a TIIL-style ShapesWorld set.

    python benchmarks/inconsistency.py [--model PATH] [--quick] [--tune N] [--test N] [--align-steps N]

The set is built with the ShapesWorld generator (``build_scene``, seeds far from the training seeds),
one kind per pair in turn:
- consistent: a 1-2 object scene and its own caption;
- colour: the caption gives one object another colour (ground truth: that colour word, the object's mask);
- shape: the caption gives one object another shape (the shape word, the object's mask);
- missing: a 2-object caption with positions, the image lacks one object (any word of the missing
  object, the mask where it would be).
Both image and caption are exact renders of the generator (no model samples).

Reported per split: detection AUROC of the consistency score (inconsistent = positive, ranked by
``1 - score``), accuracy at the decision threshold, word accuracy (top word in the ground-truth words;
``word_acc`` with the default word score, the image alone, ``word_acc_con`` with the image-vs-edit
contrast), mIoU of the final binary region vs the ground-truth mask on the inconsistent pairs
(``mIoU``: refined, the default; ``mIoU_unref``: the latent-resolution mask before the refinement, with
its own tuned threshold; ``mIoU_init``: step 2's initial region at 0.3), UNet evaluations and seconds
per pair. Tuning: the consistency threshold (best balanced accuracy) and the final mask thresholds (best
mIoU, from the stored soft masks) are chosen on the ``tune`` split only; the ``held-out`` split is never
looked at while tuning and is reported with the tuned values. Writes
benchmarks/results/inconsistency.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.inconsistency import (  # noqa: E402
    DEFAULT_ALIGN_BATCH,
    DEFAULT_ALIGN_STEPS,
    DEFAULT_FINAL_THRESHOLD,
    DEFAULT_LR,
    DEFAULT_REFINE_TOLERANCE,
    DEFAULT_THRESHOLD,
    localize_inconsistency,
    save_thresholds,
)
from diffusion_xai.shapesworld import (  # noqa: E402
    COLORS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_DIR,
    SHAPES,
    SIZES,
    load_shapesworld_pipeline,
)
from diffusion_xai.shapesworld.scene import LAYOUTS, POSITIONS, build_scene, render  # noqa: E402

KINDS = ("consistent", "color", "shape", "missing")
SPLIT_SEEDS = {"tune": 2 * 10**9, "held-out": 3 * 10**9}  # training encodes scenes 0..num_latents-1
MASK_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


def _pick(rng: np.random.Generator, values, exclude=None):
    vals = [v for v in values if v != exclude]
    return vals[int(rng.integers(len(vals)))]


def make_pair(kind: str, seed: int) -> dict:
    """One pair: image (64, 64, 3) uint8, caption, ground-truth words (set) and mask (None if consistent)."""
    rng = np.random.default_rng(seed)
    n = 2 if kind == "missing" else int(rng.integers(1, 3))
    layout = LAYOUTS[n][int(rng.integers(len(LAYOUTS[n])))] if n > 1 else (_pick(rng, POSITIONS),)
    mention_position = kind == "missing" or bool(rng.random() < 0.5)
    specs = [[_pick(rng, SHAPES), _pick(rng, list(COLORS)), _pick(rng, SIZES), layout[k], True, bool(rng.random() < 0.5)]
             for k in range(n)]
    target = int(rng.integers(n))
    jitter_seed = int(rng.integers(2**31))
    truth = build_scene([tuple(s) for s in specs], mention_position, rng=np.random.default_rng(jitter_seed))
    caption_specs = [list(s) for s in specs]
    if kind == "color":
        caption_specs[target][1] = _pick(rng, list(COLORS), exclude=specs[target][1])
    elif kind == "shape":
        caption_specs[target][0] = _pick(rng, SHAPES, exclude=specs[target][0])
    said = build_scene([tuple(s) for s in caption_specs], mention_position, rng=np.random.default_rng(jitter_seed))
    image = truth.image
    if kind == "consistent":
        return dict(kind=kind, seed=seed, image=image, caption=truth.caption, words=set(), mask=None)
    owned = [i for i, o in enumerate(said.word_objects) if o == target]
    roles = {"color": ["color"], "shape": ["shape"], "missing": ["color", "shape", "size", "position"]}[kind]
    words = {said.words[i] for i in owned if said.word_roles[i] in roles}
    if kind == "missing":
        image = render([o for k, o in enumerate(truth.objects) if k != target])
    return dict(kind=kind, seed=seed, image=image, caption=said.caption, words=words,
                mask=truth.objects[target].mask)


def make_split(name: str, n: int) -> list[dict]:
    return [make_pair(KINDS[i % len(KINDS)], SPLIT_SEEDS[name] + i) for i in range(n)]


def auroc(scores_pos, scores_neg) -> float:
    """P(a positive outranks a negative), ties count half (Mann-Whitney U / (n_pos n_neg))."""
    p, q = np.asarray(scores_pos, float)[:, None], np.asarray(scores_neg, float)[None, :]
    if p.size == 0 or q.size == 0:
        return float("nan")
    return float(((p > q).sum() + 0.5 * (p == q).sum()) / (p.size * q.size))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


def best_threshold(scores, labels) -> float:
    """Consistency threshold with the best balanced accuracy (consistent = score >= threshold)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)  # labels: True = inconsistent
    cands = np.unique(np.concatenate([scores, [1.0 + 1e-9]]))
    best, best_t = -1.0, DEFAULT_THRESHOLD
    for t in cands:
        pred_inc = scores < t
        ba = 0.5 * ((pred_inc[labels]).mean() if labels.any() else 1.0) + 0.5 * (
            (~pred_inc[~labels]).mean() if (~labels).any() else 1.0)
        if ba > best:
            best, best_t = ba, float(t)
    return best_t


def evaluate(records: list[dict], threshold: float, mask_threshold: float, raw_threshold: float) -> dict:
    inc = [r for r in records if r["kind"] != "consistent"]
    con = [r for r in records if r["kind"] == "consistent"]
    acc = np.mean([(r["score"] >= threshold) == (r["kind"] == "consistent") for r in records])
    return {
        "pairs": len(records),
        "AUROC": auroc([1 - r["score"] for r in inc], [1 - r["score"] for r in con]),
        "acc@thr": float(acc),
        "word_acc": float(np.mean([r["word"] in r["gt_words"] for r in inc])) if inc else float("nan"),
        "word_acc_con": float(np.mean([r["word_contrast"] in r["gt_words"] for r in inc])) if inc else float("nan"),
        "word_acc_loc": float(np.mean([r["word_local"] in r["gt_words"] for r in inc])) if inc else float("nan"),
        "mIoU": float(np.mean([iou(r["soft"] >= mask_threshold, r["gt_mask"]) for r in inc])) if inc else float("nan"),
        "mIoU_unref": float(np.mean([iou(r["raw_soft"] >= raw_threshold, r["gt_mask"]) for r in inc]))
        if inc else float("nan"),
        "mIoU_init": float(np.mean([iou(r["init_soft"] >= 0.3, r["gt_mask"]) for r in inc])) if inc else float("nan"),
        "evals/pair": float(np.mean([r["unet_evals"] for r in records])),
        "s/pair": float(np.mean([r["seconds"] for r in records])),
    }


def run_split(xp, pairs: list[dict], kw: dict, desc: str) -> list[dict]:
    from tqdm.auto import tqdm

    out = []
    for p in tqdm(pairs, desc=desc, unit="pair"):
        res = localize_inconsistency(xp, p["image"], p["caption"], progress=False, **kw)
        out.append(dict(kind=p["kind"], seed=p["seed"], caption=p["caption"], gt_words=sorted(p["words"]),
                        score=res.score, word=res.word,
                        word_contrast=res.words[int(np.argmax(res.word_scores_contrast))],
                        word_local=res.words[int(np.argmax(res.word_scores_local))],
                        word_scores_local=list(res.word_scores_local),
                        word_scores=res.word_score_dict(), words=list(res.words),
                        word_scores_image=list(res.word_scores_image),
                        word_scores_contrast=list(res.word_scores_contrast), soft=res.mask_soft.numpy(),
                        raw_soft=res.mask_soft_unrefined.numpy(),
                        init_soft=res.initial_mask_soft.numpy(),
                        gt_mask=p["mask"] if p["mask"] is not None else np.zeros((64, 64), bool),
                        unet_evals=res.unet_evals, seconds=res.seconds))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODEL_DIR), help="ShapesWorld pipeline folder (default: the embedded one)")
    ap.add_argument("--quick", action="store_true", help="a small run: 8 + 8 pairs, 20 alignment steps")
    ap.add_argument("--tune", type=int, default=40, help="pairs of the tuning split")
    ap.add_argument("--test", type=int, default=40, help="pairs of the held-out split")
    ap.add_argument("--align-steps", type=int, default=None, help=f"default {DEFAULT_ALIGN_STEPS} (--quick: 20)")
    ap.add_argument("--align-batch", type=int, default=DEFAULT_ALIGN_BATCH)
    ap.add_argument("--mask-seeds", type=int, default=10)
    ap.add_argument("--word-samples", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="inconsistency", help="name of the JSON written")
    ap.add_argument("--save-calibration", action="store_true",
                    help="store the tuned thresholds with the model (inconsistency_calibration.json), so calls "
                         "with the same alignment settings use them by default")
    a = ap.parse_args(argv)
    n_tune, n_test = (min(a.tune, 8), min(a.test, 8)) if a.quick else (a.tune, a.test)
    steps = a.align_steps or (20 if a.quick else DEFAULT_ALIGN_STEPS)

    pipe = load_shapesworld_pipeline(a.model)
    if a.device:
        pipe = pipe.to(a.device)
    xp = XAIPipeline(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)
    kw = dict(align_steps=steps, align_batch=a.align_batch, num_mask_seeds=a.mask_seeds, word_samples=a.word_samples,
              seed=a.seed)
    t0 = time.perf_counter()
    recs = {name: run_split(xp, make_split(name, n), kw, name) for name, n in (("tune", n_tune), ("held-out", n_test))}

    # tuning: the tune split only
    tune = recs["tune"]
    thr = best_threshold([r["score"] for r in tune], [r["kind"] != "consistent" for r in tune])
    inc_tune = [r for r in tune if r["kind"] != "consistent"]
    def fit(key):
        return float(max(MASK_GRID, key=lambda t: np.mean([iou(r[key] >= t, r["gt_mask"]) for r in inc_tune]))) \
            if inc_tune else DEFAULT_FINAL_THRESHOLD
    mthr, rthr = fit("soft"), fit("raw_soft")

    rows = []
    for name, rs in recs.items():
        rows.append({"split": name, "setting": "defaults",
                     **evaluate(rs, DEFAULT_THRESHOLD, DEFAULT_FINAL_THRESHOLD, DEFAULT_FINAL_THRESHOLD)})
        rows.append({"split": name, "setting": "tuned", **evaluate(rs, thr, mthr, rthr)})
    kind_rows = []
    for kind in KINDS[1:]:
        rs = [r for r in recs["held-out"] if r["kind"] == kind]
        if rs:
            e = evaluate(rs, thr, mthr, rthr)
            kind_rows.append({"held-out kind": kind, "pairs": len(rs), "word_acc": e["word_acc"], "word_acc_loc": e["word_acc_loc"], "mIoU": e["mIoU"],
                              "detected": float(np.mean([r["score"] < thr for r in rs]))})
    title = (f"D-TIIL on ShapesWorld ({steps} alignment steps x {a.align_batch}; tuned on 'tune': "
             f"consistency threshold {thr:.6f}, final mask threshold {mthr:.2f}, unrefined {rthr:.2f})")
    print(table(rows, title))
    if kind_rows:
        print()
        print(table(kind_rows, "held-out, per kind of contradiction (tuned thresholds)"))
    strip = ("soft", "raw_soft", "init_soft", "gt_mask")
    path = write_json(a.name, {
        "model": a.model, "quick": a.quick, "settings": {**kw, "defaults": {
            "threshold": DEFAULT_THRESHOLD, "final_threshold": DEFAULT_FINAL_THRESHOLD}},
        "tuned": {"threshold": thr, "final_threshold": mthr, "final_threshold_unrefined": rthr}, "rows": rows, "per_kind": kind_rows,
        "seconds": time.perf_counter() - t0,
        "pairs": {name: [{k: v for k, v in r.items() if k not in strip} for r in rs] for name, rs in recs.items()}})
    print(f"wrote {path}")
    if a.save_calibration:
        cal = save_thresholds(a.model, steps, a.align_batch, DEFAULT_LR, thr, mthr, DEFAULT_REFINE_TOLERANCE,
                              fitted_on=f"benchmarks/inconsistency.py tune split ({n_tune} pairs, seed {a.seed})",
                              held_out_auroc=next(r["AUROC"] for r in rows
                                                  if r["split"] == "held-out" and r["setting"] == "tuned"))
        print(f"stored the tuned thresholds in {cal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
