"""Audit -> explain -> fix -> re-audit, on ShapesWorld's injected circle-colour bias.

1. Audit: generate "a circle" images, judge their colour with the ShapesWorld oracle, measure the share of
   every colour with Wilson 95% intervals (the generator paints unqualified circles red 80% of the time).
2. Explain: DiffusionPID redundancy R(colour, "circle") of "a {colour} circle" for every colour: the colour
   the model has tied to circles shares the most information with the word "circle".
3. Fix: ``xp.erase("circle", method="debias", targets=uniform colours, judge=oracle)`` (a reversible LoRA).
4. Re-audit with the edit on, print before/after, remove the edit (the model is left as it was).

    python examples/audit_explain_fix.py                      # the embedded model, ~3-5 minutes on a CPU
    python examples/audit_explain_fix.py --model runs/interim_model --images 32 --pid-samples 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from diffusion_xai import XAIPipeline
from diffusion_xai.audit import OracleJudge, load_rows, parse_spec, run_audit, summarize
from diffusion_xai.shapesworld import COLORS, DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapesworld_pipeline

SPEC = """
name = "{name}"
[generation]
images_per_prompt = {images}
seed = 1000
batch_size = 64
[prompts]
list = ["a circle"]
[attributes.color]
values = {colors}
"""


def audit(xp, name: str, images: int, out: Path) -> dict:
    """Audit the colour of "a circle"; returns the colour summary of that prompt."""
    spec = parse_spec(SPEC.format(name=name, images=images, colors=json.dumps(list(COLORS))), f"{name}.toml")
    run_audit(spec, out, xp=xp, progress=True)
    return summarize(spec, load_rows(out))["prompts"]["a circle"]["attributes"]["color"]


def show(title: str, d: dict) -> None:
    print(f"\n{title}  (n={d['n']}, TV to uniform {d['tv']:.3f}, chi-square p {d['p_value']:.2g})")
    for v in d["shares"]:
        print(f"  {v:7s} {d['shares'][v]:6.3f}  [{d['ci_low'][v]:.3f}, {d['ci_high'][v]:.3f}]")


def main(argv=None) -> dict:
    """Run the loop; returns {"before", "after": colour summaries of the two audits, "redundancy": {colour: R}}."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ShapesWorld model folder (default: the embedded model)")
    ap.add_argument("--images", type=int, default=64, help="images per audit")
    ap.add_argument("--pid-samples", type=int, default=32, help="(logSNR, noise) samples per PID analysis")
    ap.add_argument("--rounds", type=int, default=15, help="most debias rounds (stops early within 0.1 of uniform)")
    ap.add_argument("--out", default=None, help="folder for the audits (default: a temporary folder)")
    a = ap.parse_args(argv)

    xp = XAIPipeline(load_shapesworld_pipeline(a.model), batch_size=64, default_steps=DEFAULT_STEPS,
                     default_guidance=DEFAULT_GUIDANCE)
    out = Path(a.out or tempfile.mkdtemp(prefix="audit_explain_fix_"))

    before = audit(xp, "before", a.images, out / "before")
    show("1. audit: colour of 'a circle'", before)

    print("\n2. explain: PID redundancy R(colour, circle) of 'a {colour} circle' (nats, mean of 2 seeds)")
    red = {}
    for c in COLORS:
        rs = [xp.pid(f"a {c} circle", c, "circle", seed=s, num_samples=a.pid_samples, progress=False).R for s in (0, 1)]
        red[c] = sum(rs) / len(rs)
    for c, r in sorted(red.items(), key=lambda kv: -kv[1]):
        print(f"  {c:7s} R = {r:.3f}")
    top = max(before["shares"], key=before["shares"].get)
    print(f"  most frequent colour: {top}; highest redundancy with 'circle': {max(red, key=red.get)}")

    print("\n3. fix: debias 'circle' towards uniform colours (UCE debias, judged by the oracle)")
    oracle = OracleJudge()
    spec_attr = parse_spec(SPEC.format(name="j", images=1, colors=json.dumps(list(COLORS))), "j").attributes

    def judge(images):
        return [v.labels["color"] for v in oracle(images, ["a circle"] * len(images), spec_attr, miss_rate=False)]

    edit = xp.erase("circle", method="debias", targets={c: 1 / len(COLORS) for c in COLORS}, judge=judge,
                    prompts=["a circle"], templates=("a {}",), token_positions="word_to_eos", num_samples=32,
                    rounds=a.rounds, tol=0.1,
                    seed=7, progress=True)
    for h in edit.history:
        print(f"  round {h['round']}: max gap {h['max_gap']:.3f}")
    try:
        after = audit(xp, "after", a.images, out / "after")
    finally:
        edit.remove()
    show("4. re-audit with the edit", after)
    print(f"\nbefore -> after: share {top} {before['shares'][top]:.3f} -> {after['shares'][top]:.3f}; "
          f"TV to uniform {before['tv']:.3f} -> {after['tv']:.3f}")
    print(f"audits in {out} (run `diffusion-xai audit report {out / 'before'}` for the HTML report)")
    return {"before": before, "after": after, "redundancy": red}


if __name__ == "__main__":
    main()
