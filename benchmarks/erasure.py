"""Concept erasure on ShapesWorld: Acc_e / Acc_s / Acc_g / H per erased shape and colour, edit times, debias.

For every shape (and colour) erased in turn, with each method, the ShapesWorld oracle judges generated
images (:func:`diffusion_xai.erasure.evaluate_shapesworld`):

* Acc_e -- prompts naming the erased concept ("a circle", "a red circle", ...) that still show it (lower is
  better);
* Acc_s -- prompts of the other shapes (colours) that show theirs (higher is better), also given relative to
  the unedited model's rate;
* Acc_g -- prompts with the concept's synonyms (SYNONYMS: disc, box, plus, violet) that still show it
  (lower is better; none for triangle and most colours);
* H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)) (2 terms without synonyms); edit time (vectors + solve).

Also: the closed-form edit time on the SD 1.5 architecture with random weights (CPU), and debias of the
injected circle -> red bias (BIASES: 0.8) towards uniform colour shares, judged by the oracle.
``--tune`` picks the neighbour-mining parameters (d1, s1, s2, K) on a held-out concept (square) by H.

    python benchmarks/erasure.py --quick                 # minutes: 2 concepts, few samples
    python benchmarks/erasure.py                         # the full table (README numbers)
    python benchmarks/erasure.py --model runs/interim_model --quick
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.erasure import erase, evaluate_shapesworld, shapesworld_templates  # noqa: E402
from diffusion_xai.shapesworld import (  # noqa: E402
    COLORS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    SHAPES,
    load_shapesworld_pipeline,
)
from diffusion_xai.shapesworld import judge as oracle  # noqa: E402


def load(path: str | None) -> XAIPipeline:
    pipe = load_shapesworld_pipeline(path)
    return XAIPipeline(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)


def others(concept: str) -> list[str]:
    pool = SHAPES if concept in SHAPES else tuple(COLORS)
    return [c for c in pool if c != concept]


def guide_for(concept: str, guide: str) -> str:
    """The guide text: "" (the empty prompt, UCE's default) or, with ``"anchor"``, the next concept of the same
    kind (circle -> square, ..., red -> green, ...): with "" the erased prompt falls back to the model's
    unconditional prior, which itself draws the concept about 1/4 of the time, so Acc_e cannot go below that."""
    if guide != "anchor":
        return guide
    pool = list(SHAPES) if concept in SHAPES else list(COLORS)
    return pool[(pool.index(concept) + 1) % len(pool)]


def run_method(xp, concept: str, method: str, opts: dict, a) -> tuple[dict, float]:
    """Erase ``concept`` with ``method`` ("name" or "name@token_positions"), evaluate, remove the edit."""
    method, _, positions = method.partition("@")
    kwargs = dict(preserve=others(concept), templates=shapesworld_templates(concept), method=method,
                  guide=guide_for(concept, a.guide),
                  token_positions=positions or a.token_positions, seed=a.seed, progress=False)
    kwargs.update(opts.get(method, {}))
    edit = erase(xp, concept, **kwargs)
    try:
        m = evaluate_shapesworld(xp, concept, num_samples=a.num_samples, seed=a.seed, num_inference_steps=a.steps)
    finally:
        edit.remove()
    return m, edit.edit_time_s


def tune_neighbors(xp, a) -> tuple[dict, list[dict]]:
    """Grid over (d1, s1, s2, K) on the held-out concept; best H wins (ties: higher Acc_s)."""
    grid = [dict(d1=d1, s1=s1, s2=s2, num_neighbors=k) for d1, (s1, s2), k in itertools.product(
        (0.3, 0.6, 1.0), ((0.7, 0.9), (0.85, 0.98), (0.5, 0.8)), (8, 32))]
    if a.quick:
        grid = grid[:: max(1, len(grid) // 4)]
    rows = []
    for g in grid:
        try:
            m, _ = run_method(xp, a.tune_concept, "neighbors", {"neighbors": g}, a)
        except ValueError as err:  # infeasible band for this d1
            print(f"skip {g}: {err}")
            continue
        rows.append({**g, "acc_e": m["acc_e"], "acc_s": m["acc_s"], "acc_g": m["acc_g"], "H": m["H"]})
        print(rows[-1])
    best = max(rows, key=lambda r: (round(r["H"], 3), r["acc_s"]))
    return {k: best[k] for k in ("d1", "s1", "s2", "num_neighbors")}, rows


def sd15_time(reps: int) -> dict:
    """Closed-form edit time on the SD 1.5 architecture (random weights, float32, CPU)."""
    from diffusion_xai.testing import architecture_pipeline

    t = time.perf_counter()
    xp = XAIPipeline(architecture_pipeline("sd15"))
    build = time.perf_counter() - t
    solve, wall, parts = [], [], []
    for r in range(reps + 1):
        t = time.perf_counter()
        edit = erase(xp, "circle", preserve=["square", "triangle", "cross"], templates=["{}", "a {}"], progress=False)
        w = time.perf_counter() - t
        edit.remove()
        xp._prompt_cache.clear()  # time the text encoding too
        if r:  # the first is a warm-up
            solve.append(edit.edit_time_s)
            wall.append(w)
            parts.append(edit.timings)
    return {"build_s": build, "edit_s": statistics.median(solve), "edit_with_adapter_s": statistics.median(wall),
            "solve_only_s": statistics.median(p["solve_s"] for p in parts),
            "text_encoding_s": statistics.median(p["vectors_s"] for p in parts),
            "rank": edit.rank, "modules": len(edit.modules)}


def debias(xp, a) -> dict:
    """Move the circle's colour distribution (injected: 0.8 red) towards uniform shares."""
    def colour(images):
        out = []
        for im in images:
            objs = oracle(im)
            out.append(max(objs, key=lambda o: o.mask.sum()).color if objs else None)
        return out

    targets = {c: 1 / len(COLORS) for c in COLORS}
    t = time.perf_counter()
    edit = erase(xp, "circle", method="debias", targets=targets, judge=colour, templates=["a {}"],
                 token_positions=a.token_positions,
                 num_samples=a.debias_samples, rounds=a.debias_rounds, tol=0.05, seed=a.seed,
                 num_inference_steps=a.steps, height=64, width=64, progress=True)
    wall = time.perf_counter() - t
    h = edit.history
    res = {"targets": targets, "initial_shares": h[0]["shares"], "final_shares": h[-1]["shares"],
           "initial_max_gap": h[0]["max_gap"], "final_max_gap": h[-1]["max_gap"], "rounds": len(h) - 1,
           "red_share_before": h[0]["shares"]["red"], "red_share_after": h[-1]["shares"]["red"],
           "converged": h[-1]["max_gap"] < 0.05, "alpha": h[-1]["alpha"], "solve_s": edit.edit_time_s,
           "wall_s": wall, "images_per_round": a.debias_samples, "step_decay": edit.params["step_decay"],
           "history": h}
    edit.remove()
    return res


def _no_nan(x):
    """NaN (no synonyms) -> None, so the JSON is strict."""
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="ShapesWorld pipeline folder (default: the embedded model)")
    p.add_argument("--quick", action="store_true", help="2 concepts, few samples, short fine-tuning")
    p.add_argument("--methods", default=None,
                   help="comma-separated; 'name@word_to_eos' picks the token positions (default: closed_form, "
                        "closed_form@word_to_eos, neighbors, finetune; quick: closed_form, neighbors)")
    p.add_argument("--concepts", default=None, help="comma-separated (default: every shape and colour)")
    p.add_argument("--num-samples", type=int, default=None, help="images per prompt (default 16, quick 2)")
    p.add_argument("--token-positions", default="last", choices=("last", "word_to_eos"))
    p.add_argument("--finetune-steps", type=int, default=None, help="default 200, quick 10")
    p.add_argument("--tune", action="store_true", help="tune the neighbour parameters on --tune-concept first")
    p.add_argument("--tune-concept", default="square")
    p.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5 architecture timing (4.6 GB, ~20 s)")
    p.add_argument("--no-debias", action="store_true")
    p.add_argument("--debias-samples", type=int, default=None, help="images per round (default 96, quick 12)")
    p.add_argument("--debias-rounds", type=int, default=None, help="default 30, quick 3")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps of every generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="name of the JSON written (default erasure / erasure_quick)")
    p.add_argument("--guide", default="", help='"" (the empty prompt, default) or "anchor" (the next shape / colour)')
    a = p.parse_args(argv)
    a.num_samples = a.num_samples or (2 if a.quick else 16)
    a.finetune_steps = a.finetune_steps or (10 if a.quick else 200)
    a.debias_samples = a.debias_samples or (12 if a.quick else 96)
    a.debias_rounds = a.debias_rounds or (3 if a.quick else 30)
    concepts = a.concepts.split(",") if a.concepts else (["circle", "red"] if a.quick else [*SHAPES, *COLORS])
    methods = (a.methods.split(",") if a.methods else
               ["closed_form", "neighbors"] if a.quick else
               ["closed_form", "closed_form@word_to_eos", "neighbors", "finetune"])

    xp = load(a.model)
    payload: dict = {"model": a.model or "embedded", "quick": a.quick, "num_samples": a.num_samples, "steps": a.steps,
                     "token_positions": a.token_positions, "seed": a.seed, "guide": a.guide}
    neighbor_opts: dict = {}
    if a.tune and any(m.startswith("neighbors") for m in methods):
        neighbor_opts, grid = tune_neighbors(xp, a)
        payload["neighbor_tuning"] = {"concept": a.tune_concept, "chosen": neighbor_opts, "grid": grid}
        print("neighbour parameters:", neighbor_opts)
    opts = {"closed_form": {}, "neighbors": neighbor_opts,
            "finetune": {"steps": a.finetune_steps, "num_inference_steps": a.steps, "height": 64, "width": 64,
                         "preserve": ()}}  # ESD: no preserve

    rows = []
    for concept in concepts:
        base = evaluate_shapesworld(xp, concept, num_samples=a.num_samples, seed=a.seed, num_inference_steps=a.steps)
        rows.append({"concept": concept, "method": "none", "acc_e": base["acc_e"], "acc_s": base["acc_s"],
                     "acc_s_rel": 1.0, "acc_g": base["acc_g"], "H": base["H"], "edit_s": 0.0})
        print(table(rows[-1:], ""))
        for method in methods:
            m, secs = run_method(xp, concept, method, opts, a)
            rel = m["acc_s"] / base["acc_s"] if base["acc_s"] else float("nan")
            rows.append({"concept": concept, "method": method, "acc_e": m["acc_e"], "acc_s": m["acc_s"],
                         "acc_s_rel": rel, "acc_g": m["acc_g"], "H": m["H"], "edit_s": secs})
            print(table(rows[-1:], ""))
    print(table(rows, f"Concept erasure on ShapesWorld ({a.num_samples} images per prompt)"))
    summary = []
    for method in ["none", *methods]:
        r = [x for x in rows if x["method"] == method]
        g = [x["acc_g"] for x in r if not np.isnan(x["acc_g"])]
        summary.append({"method": method, "acc_e": float(np.mean([x["acc_e"] for x in r])),
                        "acc_s_rel": float(np.mean([x["acc_s_rel"] for x in r])),
                        "acc_g": float(np.mean(g)) if g else float("nan"),
                        "H": float(np.mean([x["H"] for x in r])), "edit_s": float(np.mean([x["edit_s"] for x in r]))})
    print(table(summary, "Mean over concepts"))
    payload.update(rows=rows, summary=summary)

    if not a.no_debias:
        payload["debias"] = d = debias(xp, a)
        print(f"debias circle colour: red share {d['red_share_before']:.3f} -> {d['red_share_after']:.3f}, "
              f"max gap {d['initial_max_gap']:.3f} -> {d['final_max_gap']:.3f} in {d['rounds']} rounds")
    if not a.no_sd15:
        payload["sd15"] = s = sd15_time(reps=1 if a.quick else 3)
        print(f"SD 1.5 architecture closed-form edit: {s['edit_s']:.2f} s ({s['modules']} matrices, rank "
              f"{s['rank']}; {s['edit_with_adapter_s']:.2f} s with the adapter)")
    path = write_json(a.name or ("erasure" + ("_quick" if a.quick else "")), _no_nan(payload))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
