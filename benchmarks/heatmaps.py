"""DAAM heatmaps against ShapesWorld ground truth.

    python benchmarks/heatmaps.py [--model PATH] [--images 100] [--threshold 0.4]

For generated one- and two-object images, every colour and shape word whose object the oracle
finds (right colour and shape) is scored by the IoU between the word's thresholded heatmap
(DAAM protocol: min-max normalise, threshold tau, bicubic upsampling to 64x64) and that object's
oracle mask. Also reported: the IoU of the same map with the *other* object (two-object images:
word-specific localisation, not just "where the objects are"), and a sweep over tau.
Writes benchmarks/results/heatmaps.json.
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
from diffusion_xai.shapesworld import (  # noqa: E402  # noqa: E402
    COLORS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_DIR,
    SHAPES,
    judge,
    load_shapesworld_pipeline,
)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def ci95(x) -> tuple[float, float]:
    x = np.asarray(x, float)
    h = 1.96 * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return float(x.mean()), float(h)


def prompts(n: int, rng) -> list[tuple[str, list[tuple[str, str]]]]:
    out = []
    for i in range(n):
        if i % 2 == 0:
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            out.append((f"a {c} {s}", [(str(c), str(s))]))
        else:
            c1, c2 = rng.choice(list(COLORS), 2, replace=False)
            s1, s2 = rng.choice(SHAPES, 2, replace=False)
            out.append((f"a {c1} {s1} and a {c2} {s2}", [(str(c1), str(s1)), (str(c2), str(s2))]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    n = 10 if a.quick else a.images
    folder = Path(a.model) if a.model else MODEL_DIR
    xp = XAIPipeline(load_shapesworld_pipeline(folder), batch_size=256, default_steps=DEFAULT_STEPS,
                     default_guidance=DEFAULT_GUIDANCE)
    rng = np.random.default_rng(0)
    taus = [0.2, 0.3, 0.4, 0.5, 0.6]
    scores = {tau: {"color": [], "shape": []} for tau in taus}
    other = {"color": [], "shape": []}
    used = skipped = 0
    t0 = time.perf_counter()
    specs = prompts(n, rng)
    batch = 25
    for b in range(0, len(specs), batch):
        chunk = specs[b:b + batch]
        res = xp.heatmaps([c[0] for c in chunk], seed=b, progress=False)
        for i, (_prompt, objs) in enumerate(chunk):
            found = judge(np.asarray(res.images[i]))
            masks = {}
            for c, s in objs:
                hit = [o for o in found if o.color == c and o.shape == s]
                if len(hit) == 1:
                    masks[(c, s)] = hit[0].mask
            if len(masks) != len(objs):
                skipped += 1
                continue
            used += 1
            for k, (c, s) in enumerate(objs):
                for role, word in (("color", c), ("shape", s)):
                    occ = None
                    for tau in taus:
                        m = res.mask(word, i, threshold=tau, size=(64, 64), occurrence=occ).numpy()
                        scores[tau][role].append(iou(m, masks[(c, s)]))
                    if len(objs) == 2:
                        m = res.mask(word, i, threshold=a.threshold, size=(64, 64)).numpy()
                        other[role].append(iou(m, masks[objs[1 - k]]))
    seconds = (time.perf_counter() - t0) / n
    rows = []
    for role in ("color", "shape"):
        mean, h = ci95(scores[a.threshold][role])
        omean, oh = ci95(other[role]) if other[role] else (float("nan"), float("nan"))
        rows.append({"word": role, "pairs": len(scores[a.threshold][role]), f"mIoU@{a.threshold}": mean,
                     "ci95": h, "IoU_with_other_object": omean, "ci95_other": oh})
    sweep = [{"tau": tau, "mIoU_color": ci95(scores[tau]["color"])[0], "mIoU_shape": ci95(scores[tau]["shape"])[0]}
             for tau in taus]
    print(table(rows, f"DAAM heatmaps vs oracle masks ({used} images used, {skipped} skipped: an object "
                      f"was not drawn right)"))
    print()
    print(table(sweep, "Threshold sweep"))
    print(f"\nseconds per image (generation + heatmaps, batched by {batch}): {seconds:.3f}")
    print("wrote", write_json("heatmaps", {"rows": rows, "sweep": sweep, "images_used": used,
                                           "images_skipped": skipped, "seconds_per_image": seconds,
                                           "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}))


if __name__ == "__main__":
    main()
