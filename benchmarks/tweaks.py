"""Text-embedding tweaks (T2I-Zero CBS and cross-token NMS) on ShapesWorld multi-object prompts.

For every prompt and every configuration (plain, CBS, NMS, CBS+NMS) the same per-sample noise seeds
are generated (sample i starts from ``randn`` seeded with its own seed, independent of batching) and
judged by the ShapesWorld oracle (:func:`diffusion_xai.shapesworld.judge`):

* all_correct -- every named object appears with its colour and shape (extra objects allowed);
* exact -- the detected (shape, colour) multiset equals the named one;
* dominance -- concept dominance: some named shape is missing altogether (any colour);
* leakage -- colour leakage: an object of a named shape shows another named object's colour.

Single-object prompts check that the tweaks leave easy prompts alone (all_correct within 2 points).
Time per image is measured interleaved (plain, CBS, NMS, both) on one batch, relative to plain.

The parameters are tuned on a *tuning* split of seeds (10000 + i) by mean all_correct over the
multi-object prompts (ties: lower leakage); the final table uses *held-out* seeds (0 .. N-1), for
the published defaults and the tuned settings.

Each held-out multi-object prompt also gets a per-object table: how often each named object appears
in its own colour, in another named object's colour, only in an unnamed colour, or not at all.

Cost of the README run (``--held-out tuned --multi 3 --tune-samples 40 --samples 200``): about 10.6k
images (tuning 3 prompts x 41 settings x 40 seeds + the combined best; held-out 7 prompts x 4
settings x 200 seeds), 48 min on 2 CPU threads shared with another benchmark for the tuning part
(0.05 s per image when idle), minutes on a GPU.

    python benchmarks/tweaks.py --quick                        # a smoke run (small sizes)
    python benchmarks/tweaks.py                                # the full table (README numbers)
    python benchmarks/tweaks.py --model runs/interim_model --quick
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.shapesworld import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapesworld_pipeline  # noqa: E402
from diffusion_xai.shapesworld import judge as oracle  # noqa: E402
from diffusion_xai.shapesworld.scene import scene_from_prompt  # noqa: E402
from diffusion_xai.tweaks import CorrectionBySimilarities, CrossTokenNMS, generate_with_tweaks  # noqa: E402

MULTI = ["a red circle and a blue square", "a green triangle and a yellow cross",
         "a purple square and a orange triangle", "a blue circle and a red triangle",
         "a red circle, a blue square and a green triangle"]
SINGLE = ["a red circle", "a blue square", "a green triangle", "a yellow cross"]
TUNE_SEED0 = 10_000


def load(path: str | None, device: str) -> XAIPipeline:
    pipe = load_shapesworld_pipeline(path).to(device)
    return XAIPipeline(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)


def named_objects(prompt: str) -> list[tuple[str, str]]:
    """(shape, colour) of every object the prompt names (ShapesWorld grammar)."""
    return [(o.shape, o.color) for o in scene_from_prompt(prompt).objects]


def shape_words(prompt: str) -> list[str]:
    return list(dict.fromkeys(s for s, _ in named_objects(prompt)))


def colour_words(prompt: str) -> list[str]:
    return list(dict.fromkeys(c for _, c in named_objects(prompt)))


OUTCOMES = ("right", "other_named", "other", "missing")


def object_outcomes(det: list[tuple[str, str]], named: list[tuple[str, str]]) -> list[str]:
    """Per named object: 'right' (an object of its shape has its colour), else 'other_named' (one has
    another named object's colour), else 'other' (its shape only in unnamed colours), else 'missing'."""
    out = []
    for s, c in named:
        cols = {cd for sd, cd in det if sd == s}
        others = {cn for sn, cn in named if (sn, cn) != (s, c)}
        out.append("right" if c in cols else "other_named" if cols & others else "other" if cols else "missing")
    return out


def score(image: np.ndarray, named: list[tuple[str, str]]) -> dict:
    """Oracle verdicts of one (H, W, 3) uint8 image against the named (shape, colour) objects
    (plus ``"objects"``: :func:`object_outcomes` of every named object)."""
    det = [(o.shape, o.color) for o in oracle(image)]
    want, have = Counter(named), Counter(det)
    shapes_want, shapes_have = Counter(s for s, _ in named), Counter(s for s, _ in det)
    leak = any((s_i, c_j) in have for i, (s_i, c_i) in enumerate(named)
               for j, (_, c_j) in enumerate(named) if j != i and c_j != c_i)
    return {"all_correct": not (want - have), "exact": want == have, "dominance": bool(shapes_want - shapes_have),
            "leakage": leak, "objects": object_outcomes(det, named)}


def noise(xp: XAIPipeline, seeds: list[int]) -> torch.Tensor:
    """(len(seeds), C, h, w) initial latents, sample i from ``torch.Generator().manual_seed(seeds[i])``."""
    c, s = xp.unet.config.in_channels, xp.unet.config.sample_size
    return torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(int(k))) for k in seeds])


def make_tweaks(cfg: dict, prompt: str) -> list:
    """Tweak objects of a configuration dict {"cbs": {...} | None, "nms": {...} | None} for a prompt."""
    out = []
    if cfg.get("cbs"):
        c = dict(cfg["cbs"])
        words = shape_words(prompt) + (colour_words(prompt) if c.pop("words") == "shapes+colours" else [])
        out.append(CorrectionBySimilarities(words, **c))
    if cfg.get("nms"):
        c = dict(cfg["nms"])
        w = c.pop("words")
        words = None if w == "all" else shape_words(prompt) + (colour_words(prompt) if w == "content" else [])
        out.append(CrossTokenNMS(words, **c))
    return out


def images(xp, prompt: str, tweaks: list, latents: torch.Tensor, seed: int) -> np.ndarray:
    out = generate_with_tweaks(xp, prompt, tweaks, seed=seed, num_images_per_prompt=latents.shape[0],
                               latents=latents.to(xp.device, xp.dtype), output_type="np", progress=False).images
    return (np.asarray(out) * 255).round().astype(np.uint8)


def evaluate(xp, configs: dict[str, dict], prompts: list[str], seeds: list[int], batch: int,
             desc: str) -> dict[str, dict[str, dict]]:
    """rates[config][prompt] = {metric: rate, "n": samples, "seconds": generation time} on the same seeds."""
    res = {k: {p: Counter() for p in prompts} for k in configs}
    objs = {k: {p: [Counter() for _ in named_objects(p)] for p in prompts} for k in configs}
    secs = {k: {p: 0.0 for p in prompts} for k in configs}
    chunks = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    with tqdm(total=len(prompts) * len(chunks) * len(configs), desc=desc, leave=False) as bar:
        for p in prompts:
            named = named_objects(p)
            for b, chunk in enumerate(chunks):
                lat = noise(xp, chunk)
                for k, cfg in configs.items():
                    t = time.perf_counter()
                    ims = images(xp, p, make_tweaks(cfg, p), lat, seed=b)
                    secs[k][p] += time.perf_counter() - t
                    for im in ims:
                        sc = score(im, named)
                        for j, o in enumerate(sc.pop("objects")):
                            objs[k][p][j][o] += 1
                        res[k][p].update({m: int(v) for m, v in sc.items()})
                    res[k][p]["n"] += len(ims)
                    bar.update(1)
    out = {}
    for k in configs:
        out[k] = {}
        for p in prompts:
            n = res[k][p]["n"]
            out[k][p] = {m: res[k][p][m] / n for m in ("all_correct", "exact", "dominance", "leakage")}
            out[k][p].update(n=n, seconds=secs[k][p], objects={
                f"{c} {s}": {o: objs[k][p][j][o] / n for o in OUTCOMES}
                for j, (s, c) in enumerate(named_objects(p))})
    return out


def mean_over(rates: dict[str, dict], prompts: list[str]) -> dict[str, float]:
    return {m: float(np.mean([rates[p][m] for p in prompts])) for m in ("all_correct", "exact", "dominance", "leakage")}


DEFAULTS = {"plain": {}, "cbs": {"cbs": dict(words="shapes", alpha=0.25, gamma=2, threshold=0.5)},
            "nms": {"nms": dict(words="all", alpha=0.1, sigma=1.0)}}
DEFAULTS["cbs+nms"] = {**DEFAULTS["cbs"], **DEFAULTS["nms"]}


def sweep_grid(quick: bool) -> tuple[list[dict], list[dict]]:
    """CBS: concept words x alpha x window gamma; NMS: competing words x alpha x until_step (4 = the
    first 4 of 20 steps, where the layout forms; None = every step)."""
    cbs = [dict(words=w, alpha=a, gamma=g, threshold=0.5)
           for w, a, g in itertools.product(("shapes", "shapes+colours"), (0.1, 0.25, 0.5, 0.75), (1, 2))]
    nms = [dict(words=w, alpha=a, sigma=1.0, until_step=u)
           for w, a, u in itertools.product(("all", "content", "shapes"), (0.1, 0.25, 0.5, 1.0), (4, None))]
    if quick:
        cbs, nms = [cbs[3], cbs[12]], [nms[1], nms[14]]
    return cbs, nms


def label(cfg: dict) -> str:
    parts = []
    for name in ("cbs", "nms"):
        if cfg.get(name):
            c = cfg[name]
            extra = ""
            if name == "cbs" and c.get("gamma", 2) != 2:
                extra = f", g={c['gamma']}"
            if name == "nms" and c.get("until_step") is not None:
                extra = f", until={c['until_step']}"
            parts.append(f"{name}({c['words']}, a={c['alpha']}{extra})")
    return " + ".join(parts) or "plain"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="ShapesWorld pipeline folder (default: the embedded model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--samples", type=int, default=None, help="held-out seeds per prompt (default 200, quick 16)")
    ap.add_argument("--tune-samples", type=int, default=None, help="tuning seeds per prompt (default 100, quick 8)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 20)")
    ap.add_argument("--held-out", choices=("all", "tuned"), default="all",
                    help="held-out configurations: plain + published defaults + tuned (all) or plain + tuned")
    ap.add_argument("--multi", type=int, default=None, help="use the first N multi-object prompts (default all 5)")
    a = ap.parse_args()
    n = a.samples or (16 if a.quick else 200)
    n_tune = a.tune_samples or (8 if a.quick else 100)
    multi = MULTI[:1] + MULTI[-1:] if a.quick else MULTI
    if a.multi:
        multi = MULTI[:a.multi - 1] + MULTI[-1:] if a.multi > 1 else MULTI[:1]
    single = SINGLE[:2] if a.quick else SINGLE
    xp = load(a.model, a.device)
    if a.steps:
        xp.default_steps = a.steps
    t_start = time.time()

    # 1. tuning split: each tweak alone over its grid, then the best of each combined
    cbs_grid, nms_grid = sweep_grid(a.quick)
    cands = {f"cbs{i}": {"cbs": c} for i, c in enumerate(cbs_grid)}
    cands.update({f"nms{i}": {"nms": c} for i, c in enumerate(nms_grid)})
    cands["plain"] = {}
    tune_seeds = [TUNE_SEED0 + i for i in range(n_tune)]
    tuned = evaluate(xp, cands, multi, tune_seeds, a.batch_size, "tuning")
    tune_rows = []
    for k, cfg in cands.items():
        m = mean_over(tuned[k], multi)
        tune_rows.append({"config": label(cfg), **{x: round(100 * v, 1) for x, v in m.items()}})

    def best(prefix: str) -> dict:
        keys = [k for k in cands if k.startswith(prefix)]
        k = max(keys, key=lambda k: (mean_over(tuned[k], multi)["all_correct"], -mean_over(tuned[k], multi)["leakage"]))
        return cands[k]

    best_cbs, best_nms = best("cbs"), best("nms")
    both = {**best_cbs, **best_nms}
    both_t = evaluate(xp, {"both": both}, multi, tune_seeds, a.batch_size, "tuning both")["both"]
    tune_rows.append({"config": label(both), **{x: round(100 * v, 1) for x, v in mean_over(both_t, multi).items()}})
    tuned_cfgs = {"cbs tuned": best_cbs, "nms tuned": best_nms, "cbs+nms tuned": both}
    tune_score = {"cbs tuned": mean_over(tuned[[k for k in cands if cands[k] is best_cbs][0]], multi),
                  "nms tuned": mean_over(tuned[[k for k in cands if cands[k] is best_nms][0]], multi),
                  "cbs+nms tuned": mean_over(both_t, multi)}
    best_name = max(tune_score, key=lambda k: (tune_score[k]["all_correct"], -tune_score[k]["leakage"]))
    print(table(tune_rows, f"tuning split: {n_tune} seeds x {len(multi)} multi-object prompts (rates in %)"))

    # 2. held-out seeds: plain, defaults, tuned, one run with the same seeds
    configs = {**DEFAULTS, **tuned_cfgs} if a.held_out == "all" else {"plain": {}, **tuned_cfgs}
    seeds = list(range(n))
    multi_res = evaluate(xp, configs, multi, seeds, a.batch_size, "held-out multi")
    single_res = evaluate(xp, configs, single, seeds, a.batch_size, "held-out single")

    # 3. time per image, interleaved on one batch
    p0 = multi[0]
    lat = noise(xp, list(range(min(a.batch_size, n))))
    timing_cfgs = {"plain": {}, "cbs": best_cbs, "nms": best_nms, "cbs+nms": both}
    times = interleaved({k: (lambda c=c: images(xp, p0, make_tweaks(c, p0), lat, 0)) for k, c in timing_cfgs.items()},
                        reps=1 if a.quick else 3, warmup=1)
    per_image = {k: v / lat.shape[0] for k, v in times.items()}

    rows, summary = [], {}
    plain_m, plain_s = mean_over(multi_res["plain"], multi), mean_over(single_res["plain"], single)
    for k, cfg in configs.items():
        m, s = mean_over(multi_res[k], multi), mean_over(single_res[k], single)
        tkey = {"cbs": "cbs", "cbs tuned": "cbs", "nms": "nms", "nms tuned": "nms", "cbs+nms": "cbs+nms",
                "cbs+nms tuned": "cbs+nms"}.get(k, "plain")
        summary[k] = {"config": cfg, "multi": m, "single": s,
                      "per_prompt": {**multi_res[k], **single_res[k]},
                      "time_rel": per_image[tkey] / per_image["plain"]}
        rows.append({"config": k, "settings": label(cfg), "all_correct%": round(100 * m["all_correct"], 1),
                     "exact%": round(100 * m["exact"], 1), "dominance%": round(100 * m["dominance"], 1),
                     "leakage%": round(100 * m["leakage"], 1), "single%": round(100 * s["all_correct"], 1),
                     "d_single": round(100 * (s["all_correct"] - plain_s["all_correct"]), 1),
                     "time_x": round(per_image[tkey] / per_image["plain"], 2)})
    print()
    print(table(rows, f"held-out: {n} seeds x {len(multi)} multi-object prompts (+ {len(single)} single-object), "
                      f"rates in %, time relative to plain"))
    per_prompt_rows = [{"prompt": p, **{k: round(100 * multi_res[k][p]["all_correct"], 1) for k in configs}}
                       for p in multi]
    print()
    print(table(per_prompt_rows, "all_correct% per multi-object prompt (held-out)"))
    object_rows = [{"prompt": p, "object": o, "config": k, **{x: round(100 * v, 1) for x, v in r.items()}}
                   for p in multi for k in ("plain", best_name) for o, r in multi_res[k][p]["objects"].items()]
    print()
    print(table(object_rows, "each named object (held-out): right colour / another named object's colour / "
                             "an unnamed colour / its shape missing, in %"))
    b = summary[best_name]["multi"]
    target = {"best": best_name, "all_correct_gain_points": round(100 * (b["all_correct"] - plain_m["all_correct"]), 1),
              "leakage_ratio": (b["leakage"] / plain_m["leakage"]) if plain_m["leakage"] > 0 else None,
              "single_change_points": round(100 * (summary[best_name]["single"]["all_correct"]
                                                   - plain_s["all_correct"]), 1)}
    target["met"] = bool(target["all_correct_gain_points"] >= 10 and target["leakage_ratio"] is not None
                         and target["leakage_ratio"] <= 0.5 and abs(target["single_change_points"]) <= 2)
    print(f"\nbest (chosen on the tuning split): {best_name} = {label(configs[best_name])}; "
          f"all_correct {target['all_correct_gain_points']:+.1f} points, leakage x{target['leakage_ratio']}, "
          f"single-object {target['single_change_points']:+.1f} points; target met: {target['met']}")
    path = write_json("tweaks", {
        "model": str(a.model or "embedded"), "device": a.device, "quick": a.quick, "samples": n,
        "tune_samples": n_tune, "seeds": {"held_out": [0, n - 1], "tuning": [TUNE_SEED0, TUNE_SEED0 + n_tune - 1]},
        "steps": xp.default_steps, "guidance": xp.default_guidance, "multi_prompts": multi, "single_prompts": single,
        "tuning": tune_rows, "results": summary, "seconds_per_image": per_image, "target": target,
        "wall_s": round(time.time() - t_start, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
