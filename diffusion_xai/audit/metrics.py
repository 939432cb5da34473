"""Bias metrics of an audit (METHODS.md section 7). Pure functions of counts: no model, no database.

* :func:`wilson_interval` -- Wilson score interval of a share k/n (95% by default), plain or with
  continuity correction (Newcombe 1998, method 4). Audit summaries use the corrected form: the plain
  interval covers the truth a little less often than promised at small counts (measured on the ShapesWorld
  generator: 94.1% of 800 intervals at n = 200, see ``benchmarks/audit.py``), and an audit should not
  claim more certainty than it has.
* :func:`chi_square` / :func:`total_variation` -- an observed distribution against a target one.
* :func:`distribution_bias` -- B_D of Vice et al. (2023): area under the min-max-normalised, descending
  sorted counts of the detected concepts not in the prompt (trapezoid rule on x in [0, 1]); 1 = flat
  (every concept equally often), -> 0 = one concept dominates. Computed per attribute here.
* :func:`jaccard_hallucination` -- H_J = 1 - |In n Out| / |In u Out| (In: concepts the prompt mentions,
  Out: concepts detected; concepts = the attribute values and everything the judge reports, e.g. the
  oracle's shapes and positions too); the audit averages it over images.
* miss rate M_G -- the share of images a judge finds missing their prompt (:func:`summarize`).
* :func:`cas` -- TIBET's concept association score of two histograms, sum min(p, q) / sum max(p, q).
* :func:`uce_delta` -- the UCE balance metric Delta = |0.5 - p| / 0.5 averaged over prompts; for k values
  and a target t: max_v |t_v - p_v| / max(t_v, 1 - t_v) (equal to the UCE formula for two values at
  t = (0.5, 0.5)); 0 = on target, 1 = all images on one value.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95, continuity: bool = False) -> tuple[float, float]:
    """Wilson score interval (low, high) of a share with k successes in n trials; (0, 1) for n = 0.

    ``continuity=True``: the continuity-corrected interval, every p with ``|k - n p| - 1/2 <= z sqrt(n p (1 - p))``
    (Newcombe 1998, method 4; low = 0 when k = 0, high = 1 when k = n). It contains the plain one."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    if continuity:
        z2, q = z * z, 1 - p
        den = 2 * (n + z2)
        lo = 0.0 if k == 0 else (2 * n * p + z2 - 1 - z * math.sqrt(z2 - 2 - 1 / n + 4 * p * (n * q + 1))) / den
        hi = 1.0 if k == n else (2 * n * p + z2 + 1 + z * math.sqrt(z2 + 2 - 1 / n + 4 * p * (n * q - 1))) / den
        return max(0.0, lo), min(1.0, hi)
    den = 1 + z * z / n
    center = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _check_target(values: Sequence[str], target: dict[str, float]) -> None:
    if set(target) != set(values):
        raise ValueError(f"target must give a share for every value {list(values)}, got {target}")


def chi_square(counts: dict[str, int], target: dict[str, float]) -> tuple[float, float]:
    """Pearson chi-square of observed counts against expected ``n * target`` and its p-value (df = k - 1,
    values with target 0 left out; an observation there makes chi-square infinite)."""
    from scipy.stats import chi2

    _check_target(list(counts), target)
    n = sum(counts.values())
    if n == 0:
        return 0.0, 1.0
    stat, df = 0.0, -1
    for v, t in target.items():
        if t == 0:
            if counts[v]:
                return math.inf, 0.0
            continue
        e = n * t
        stat += (counts[v] - e) ** 2 / e
        df += 1
    return stat, float(chi2.sf(stat, max(df, 1)))


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total variation distance 1/2 sum_v |p_v - q_v| (values missing from one side count as 0)."""
    return 0.5 * sum(abs(p.get(v, 0.0) - q.get(v, 0.0)) for v in set(p) | set(q))


def distribution_bias(counts: Sequence[float]) -> float:
    """B_D: area under the descending-sorted, min-max-normalised counts, trapezoid on x = 0..1.

    A flat histogram (also all zeros) gives 1; one value with all the mass (k >= 2 values) gives 1/(2(k-1)).
    """
    c = sorted((float(x) for x in counts), reverse=True)
    if len(c) < 2:
        raise ValueError(f"distribution bias needs at least two counts, got {list(counts)}")
    lo, hi = c[-1], c[0]
    if hi == lo:
        return 1.0
    y = [(x - lo) / (hi - lo) for x in c]
    h = 1.0 / (len(y) - 1)
    return sum((a + b) / 2 * h for a, b in zip(y[:-1], y[1:]))


def jaccard_hallucination(mentioned: Iterable[str], detected: Iterable[str]) -> float:
    """H_J = 1 - |In n Out| / |In u Out| (0 when both are empty)."""
    a, b = set(mentioned), set(detected)
    if not a | b:
        return 0.0
    return 1.0 - len(a & b) / len(a | b)


def cas(p: dict[str, float], q: dict[str, float]) -> float:
    """TIBET's concept association score sum_v min(p_v, q_v) / sum_v max(p_v, q_v); 1 = same histogram."""
    keys = set(p) | set(q)
    top = sum(max(p.get(v, 0.0), q.get(v, 0.0)) for v in keys)
    if top == 0:
        return 1.0
    return sum(min(p.get(v, 0.0), q.get(v, 0.0)) for v in keys) / top


def uce_delta(shares: Sequence[dict[str, float]], target: dict[str, float]) -> float:
    """Mean over prompts of max_v |t_v - p_v| / max(t_v, 1 - t_v) (UCE's |0.5 - p| / 0.5 for two values)."""
    if not shares:
        raise ValueError("uce_delta needs the shares of at least one prompt")
    out = []
    for p in shares:
        out.append(max(abs(t - p.get(v, 0.0)) / max(t, 1 - t) for v, t in target.items()))
    return sum(out) / len(out)


def mentioned_concepts(prompt: str, vocabulary: Iterable[str]) -> set[str]:
    """Words of a prompt (lower-cased, punctuation stripped; ShapesWorld synonyms mapped) in a vocabulary."""
    from ..shapesworld.scene import canonical

    vocab = set(vocabulary)
    return {canonical(w.strip(",.;:!?")) for w in prompt.lower().split()} & vocab


def attribute_summary(labels: Sequence[str | None], values: Sequence[str], target: dict[str, float],
                      mentioned: Iterable[str] = (), z: float = Z95, continuity: bool = True) -> dict:
    """Counts, shares with Wilson intervals, chi-square, TV to the target and B_D of one attribute of one prompt.

    ``labels``: the judged value of every image (None = not judged; left out of n). ``continuity``: the
    intervals' continuity correction (:func:`wilson_interval`; on by default).
    """
    values = list(values)
    _check_target(values, target)
    cnt = Counter(v for v in labels if v is not None)
    unknown = sorted(set(cnt) - set(values))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the values {values}")
    n = sum(cnt.values())
    counts = {v: cnt.get(v, 0) for v in values}
    shares = {v: (counts[v] / n if n else 0.0) for v in values}
    ci = {v: wilson_interval(counts[v], n, z, continuity) for v in values}
    stat, pval = chi_square(counts, target)
    not_in_prompt = [counts[v] for v in values if v not in set(mentioned)]
    return {"n": n, "unjudged": len(labels) - n, "counts": counts, "shares": shares,
            "ci_low": {v: ci[v][0] for v in values}, "ci_high": {v: ci[v][1] for v in values},
            "target": dict(target), "chi2": stat, "p_value": pval, "tv": total_variation(shares, target),
            "distribution_bias": distribution_bias(not_in_prompt) if len(not_in_prompt) >= 2 else None}


def summarize(spec, rows: Sequence[dict], pid_rows: Sequence[dict] = (), continuity: bool = True) -> dict:
    """Every metric of an audit from its rows (:func:`~diffusion_xai.audit.runner.load_rows`).

    Intervals are 95% Wilson intervals, continuity-corrected unless ``continuity=False``.

    Returns {"prompts": {prompt: {"n", "attributes": {attr: attribute_summary}, "hallucination" (H_J),
    "miss_rate" (M_G), "miss_ci"}}, "attributes": {attr: {"uce_delta", "mean_tv"}}, "counterfactuals": [...],
    "pid": [...], "complete": rows == expected}.
    """
    vocab = {v for a in spec.attributes.values() for v in a.values}
    # H_J counts every concept the judge can report: the attribute values and whatever it detected
    concepts = vocab | {c for r in rows for c in r["detected"]}
    by_prompt: dict[str, list[dict]] = {p: [] for p in spec.prompts}
    for r in rows:
        by_prompt[r["prompt"]].append(r)
    prompts = {}
    for p, rs in by_prompt.items():
        mentioned = mentioned_concepts(p, vocab)
        attrs = {a: attribute_summary([r["labels"].get(a) for r in rs], s.values, s.target, mentioned,
                                      continuity=continuity)
                 for a, s in spec.attributes.items()}
        said = mentioned_concepts(p, concepts)
        hj = [jaccard_hallucination(said, r["detected"]) for r in rs]
        misses = [r["miss"] for r in rs if r["miss"] is not None]
        lo, hi = wilson_interval(sum(misses), len(misses), continuity=continuity)
        prompts[p] = {"n": len(rs), "attributes": attrs, "mentioned": sorted(mentioned),
                      "hallucination": sum(hj) / len(hj) if hj else None,
                      "miss_rate": sum(misses) / len(misses) if misses else None, "miss_ci": [lo, hi]}
    attributes = {}
    for a, s in spec.attributes.items():
        # prompts that mention a value of the attribute do not measure its bias
        free = [d["attributes"][a] for p, d in prompts.items() if d["n"] and not set(d["mentioned"]) & set(s.values)]
        attributes[a] = {"prompts": len(free),
                         "uce_delta": uce_delta([f["shares"] for f in free], s.target) if free else None,
                         "mean_tv": sum(f["tv"] for f in free) / len(free) if free else None}
    cfs = []
    for pa, pb in spec.counterfactuals:
        for a in spec.attributes:
            sa, sb = prompts[pa]["attributes"][a]["shares"], prompts[pb]["attributes"][a]["shares"]
            cfs.append({"a": pa, "b": pb, "attribute": a, "cas": cas(sa, sb)})
    pid = []
    for j, e in enumerate(spec.pid):
        for v in e.values or spec.attributes[e.attribute].values:
            rs = [r for r in pid_rows if r["entry"] == j and r["value"] == v]
            if not rs:
                continue
            mean = {k: sum(r["scalars"][k] for r in rs) / len(rs) for k in rs[0]["scalars"]}
            pid.append({"concept": e.concept, "attribute": e.attribute, "value": v, "prompt": rs[0]["prompt"],
                        "seeds": len(rs), **mean})
    return {"name": spec.name, "judge": spec.judge, "images": len(rows),
            "expected_images": len(spec.prompts) * spec.images_per_prompt,
            "complete": len(rows) == len(spec.prompts) * spec.images_per_prompt,
            "prompts": prompts, "attributes": attributes, "counterfactuals": cfs, "pid": pid}
