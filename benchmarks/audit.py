"""Audit benchmark: does an audit of the ShapesWorld model recover the biases injected into its data?

    python benchmarks/audit.py [--model PATH] [--quick] [--images N] [--diffusion-images N] [--speedup]

Prompts "a circle", "a square", "a triangle", "a cross" (colour and size left out, so they come from
:data:`~diffusion_xai.shapesworld.BIASES`: circles red 80%, triangles blue 60%, squares large 75%, crosses
uniform). Audits of the same prompts:
- ``renders``: the ShapesWorld generator process itself (exact truth: the injected shares), judged by the
  oracle on ``--render-images`` images per prompt -- the acceptance check of the audit (within 5 points);
- ``coverage``: ``--coverage-replicates`` more generator audits of ``--images`` images per prompt with
  other seeds, pooled: how often the 95% Wilson intervals cover the truth, and each audit's largest error;
- ``renders/diffusion``: the same renders (the first ``--render-diffusion-images`` of every prompt) judged
  by the model itself (``DiffusionJudge``) -- the acceptance check of that judge (within 10 points);
- ``oracle``: the model's images, judged by the ShapesWorld oracle;
- ``diffusion``: the same images (read back from the oracle audit), judged by the model itself
  (``DiffusionJudge``, candidates "a {value} <shape>" of the image's own prompt), on the first
  ``--diffusion-images`` images of every prompt; its per-image agreement with the oracle is reported.
The model audits measure the *model*: where its shares differ from the injected ones, both judges see it.
For every (judge, shape, attribute, value): the true share, the measured share with its Wilson 95%
interval (continuity-corrected, the audit's default), whether it covers the truth and the error in points. Summary per judge: the largest error,
interval coverage, biases found where injected / where none was (chi-square p < 0.01), and throughput
(images per minute: generation + judging, and judging alone). ``--speedup`` also runs the model audit
under ``accelerate launch --num_processes 2`` and reports the 2-process speed-up.
Writes benchmarks/results/audit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.audit import load_rows, parse_spec, render_generator, run_audit, summarize  # noqa: E402
from diffusion_xai.audit.runner import image_path  # noqa: E402
from diffusion_xai.shapesworld import (  # noqa: E402
    BIASES,
    COLORS,
    DEFAULT_GUIDANCE,
    SHAPES,
    SIZES,
    attribute_distribution,
    load_shapesworld_pipeline,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
name = "{name}"
[generation]
images_per_prompt = {images}
seed = {seed}
steps = 20
guidance = {guidance}
batch_size = 64
[prompts]
templates = ["a {{shape}}"]
[prompts.slots]
shape = {shapes}
[attributes.color]
values = {colors}
[attributes.size]
values = {sizes}
[judge]
kind = "{judge}"
{options}
"""


def spec_text(name: str, images: int, judge: str = "oracle", options: str = "", guidance: float = DEFAULT_GUIDANCE,
              seed: int = 100000) -> str:
    return SPEC.format(name=name, images=images, guidance=float(guidance), seed=seed, shapes=json.dumps(list(SHAPES)),
                       colors=json.dumps(list(COLORS)), sizes=json.dumps(list(SIZES)), judge=judge, options=options)


def make_spec(name: str, images: int, judge: str = "oracle", options: str = "", guidance: float = DEFAULT_GUIDANCE,
              seed: int = 100000):
    return parse_spec(spec_text(name, images, judge, options, guidance, seed), f"{name}.toml")


def compare(judge: str, summary: dict, seconds: float, judge_seconds: float | None) -> tuple[list[dict], dict]:
    rows, errs, covered, found, false_alarms = [], [], [], [], []
    for shape in SHAPES:
        d = summary["prompts"][f"a {shape}"]
        for attr in ("color", "size"):
            a = d["attributes"][attr]
            truth = attribute_distribution(shape, attr)
            for v, t in truth.items():
                err = abs(a["shares"][v] - t)
                cov = a["ci_low"][v] <= t <= a["ci_high"][v]
                errs.append(err)
                covered.append(cov)
                rows.append({"judge": judge, "shape": shape, "attribute": attr, "value": v, "true": t,
                             "measured": a["shares"][v], "ci_low": a["ci_low"][v], "ci_high": a["ci_high"][v],
                             "covered": cov, "err_points": 100 * err, "n": a["n"]})
            biased = (shape, attr) in BIASES
            (found if biased else false_alarms).append(a["p_value"] < 0.01)
    n = summary["images"]
    s = {"judge": judge, "images": n, "max_err_points": 100 * max(errs), "coverage": sum(covered) / len(covered),
         "biases_found": f"{sum(found)}/{len(found)}", "false_biases": f"{sum(false_alarms)}/{len(false_alarms)}",
         "images_per_min": 60 * n / seconds,
         "judged_per_min": None if judge_seconds is None else 60 * n / judge_seconds}
    return rows, s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="ShapesWorld pipeline folder (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="a few images per prompt: checks the script end to end")
    p.add_argument("--images", type=int, default=200, help="images per prompt (model audit, oracle)")
    p.add_argument("--render-images", type=int, default=1000, help="images per prompt (generator audit, oracle)")
    p.add_argument("--coverage-replicates", type=int, default=25,
                   help="independent generator audits of --images images per prompt (other seeds), pooled to "
                        "measure how often the Wilson intervals cover the truth")
    p.add_argument("--render-diffusion-images", type=int, default=200,
                   help="images per prompt (generator audit, judged by the model)")
    p.add_argument("--diffusion-images", type=int, default=50, help="images per prompt judged by the model")
    p.add_argument("--speedup", action="store_true", help="also time a 2-process run (accelerate launch)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance scale of the audited samples")
    a = p.parse_args()
    if a.quick:
        a.images, a.diffusion_images, a.render_images, a.render_diffusion_images, a.coverage_replicates = 8, 2, 8, 2, 2
    model_dir = a.model
    pipe = load_shapesworld_pipeline(model_dir)
    if a.device:
        pipe.to(a.device)
    xp = XAIPipeline(pipe, batch_size=64, default_steps=20, default_guidance=a.guidance)
    tmp = Path(tempfile.mkdtemp(prefix="audit_bench_"))
    results, summaries = [], []

    # 1. the generator process itself (the audit machinery must find the truth)
    spec = make_spec("renders", a.render_images, guidance=a.guidance)
    t = time.perf_counter()
    run_audit(spec, tmp / "renders", generator=render_generator(), progress=False)
    r, s = compare("renders", summarize(spec, load_rows(tmp / "renders")), time.perf_counter() - t, None)
    results += r
    summaries.append(s)

    # 1a. interval coverage: many independent generator audits of the model audit's size, pooled
    cov_rows, plain_rows, replicate_max_err = [], [], []
    for k in range(a.coverage_replicates):
        cspec = make_spec(f"coverage{k}", a.images, guidance=a.guidance, seed=10**7 * (k + 1))
        run_audit(cspec, tmp / f"coverage{k}", generator=render_generator(), progress=False)
        crows = load_rows(tmp / f"coverage{k}")
        r = compare("coverage", summarize(cspec, crows), 1.0, None)[0]
        cov_rows += r
        replicate_max_err.append(max(x["err_points"] for x in r))
        plain_rows += compare("coverage", summarize(cspec, crows, continuity=False), 1.0, None)[0]
    covered = sum(r["covered"] for r in cov_rows)
    coverage = None if not cov_rows else {
        "replicates": a.coverage_replicates, "images_per_prompt": a.images, "intervals": len(cov_rows),
        "covered": covered, "coverage": covered / len(cov_rows),
        "coverage_plain_wilson": sum(r["covered"] for r in plain_rows) / len(plain_rows),
        "max_err_points_per_replicate": replicate_max_err}

    # 1b. the generator's renders judged by the model itself (the judge must find the truth too)
    rspec = make_spec("renders_diffusion", a.render_diffusion_images, "diffusion",
                      "options = {seed = 0, from_prompt = true}", guidance=a.guidance)
    t = time.perf_counter()
    run_audit(rspec, tmp / "renders_diffusion", xp=xp, generator=render_generator(), progress=True)
    t_rj = time.perf_counter() - t
    r, s = compare("renders/diffusion", summarize(rspec, load_rows(tmp / "renders_diffusion")), t_rj, t_rj)
    results += r
    summaries.append(s)

    # 2. the model, judged by the oracle
    spec = make_spec("oracle", a.images, guidance=a.guidance)
    t = time.perf_counter()
    run_audit(spec, tmp / "oracle", xp=xp, progress=True)
    t_oracle = time.perf_counter() - t
    r, s = compare("oracle", summarize(spec, load_rows(tmp / "oracle")), t_oracle, None)
    results += r
    summaries.append(s)

    # 3. the same images judged by the model itself
    dspec = make_spec("diffusion", a.diffusion_images, "diffusion", "options = {seed = 0, from_prompt = true}",
                      guidance=a.guidance)

    def saved(prompts, seeds):  # the oracle audit's images: generation is not timed twice
        return [Image.open(tmp / "oracle" / image_path(spec.prompts.index(q), s - spec.seed)).convert("RGB")
                for q, s in zip(prompts, seeds)]
    t = time.perf_counter()
    run_audit(dspec, tmp / "diffusion", xp=xp, generator=saved, progress=True)
    t_judge = time.perf_counter() - t
    gen_per_image = t_oracle / (a.images * len(SHAPES))
    r, s = compare("diffusion", summarize(dspec, load_rows(tmp / "diffusion")),
                   t_judge + gen_per_image * a.diffusion_images * len(SHAPES), t_judge)
    results += r
    summaries.append(s)
    oracle_rows = {(r["prompt_index"], r["sample"]): r["labels"] for r in load_rows(tmp / "oracle")}
    judged = load_rows(tmp / "diffusion")
    agreement = {attr: sum(r["labels"][attr] == oracle_rows[(r["prompt_index"], r["sample"])][attr] for r in judged)
                 / len(judged) for attr in ("color", "size")}

    speed = None
    if a.speedup:
        f = tmp / "speed.toml"
        f.write_text(spec_text("speed", a.images, guidance=a.guidance))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                  "diffusion_xai.audit.cli", "audit", "run", str(f), "--out", str(tmp / "two"), "--quiet",
                  "--model", str(model_dir) if model_dir else "shapesworld"]
        t = time.perf_counter()
        proc = subprocess.run(launch, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
        t_two = time.perf_counter() - t  # includes both processes' start-up and model loading
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        speed = {"one_process_s": t_oracle, "two_process_s": t_two, "speedup": t_oracle / t_two,
                 "rows_equal": [(r["prompt_index"], r["sample"], r["labels"]) for r in load_rows(tmp / "oracle")]
                 == [(r["prompt_index"], r["sample"], r["labels"]) for r in load_rows(tmp / "two")]}

    main_rows = [r for r in results if (r["shape"], r["attribute"]) in BIASES and r["value"] in ("red", "blue", "large")
                 and r["true"] > 0.5 or r["shape"] == "cross" and r["value"] in ("red", "large")]
    print(table([{k: r[k] for k in ("judge", "shape", "attribute", "value", "true", "measured", "ci_low", "ci_high",
                                    "covered", "n")} for r in main_rows], "injected biases (and the control)"))
    print()
    print(table(summaries, "audit summary per judge"))
    if coverage:
        errs = coverage["max_err_points_per_replicate"]
        print(f"\ninterval coverage over {coverage['replicates']} independent generator audits of "
              f"{coverage['images_per_prompt']} images per prompt: {coverage['covered']}/{coverage['intervals']} "
              f"= {coverage['coverage']:.3f} (nominal 0.95; without the continuity correction "
              f"{coverage['coverage_plain_wilson']:.3f}); largest error per audit: median {np.median(errs):.1f}, "
              f"max {max(errs):.1f} points; audits with every share within 5 points: "
              f"{sum(e <= 5 for e in errs)}/{len(errs)}")
    print("\nDiffusionJudge vs oracle on the model's images, per-image agreement: "
          + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    if speed:
        print(f"\n2 processes: {speed['two_process_s']:.1f} s vs 1 process {speed['one_process_s']:.1f} s: "
              f"speed-up {speed['speedup']:.2f}x, rows equal: {speed['rows_equal']}")
    path = write_json("audit", {"model": str(model_dir or "embedded"), "quick": a.quick, "guidance": a.guidance,
                                "images_per_prompt": a.images,
                                "diffusion_images_per_prompt": a.diffusion_images,
                                "render_images_per_prompt": a.render_images,
                                "render_diffusion_images_per_prompt": a.render_diffusion_images,
                                "judge_agreement_on_model_images": agreement, "coverage": coverage, "summary": summaries,
                                "shares": results, "speedup": speed, "folder": str(tmp)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
