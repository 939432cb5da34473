"""``diffusion-xai report``: the end-to-end HTML report of one prompt (see :mod:`diffusion_xai.report`).

Example::

    diffusion-xai report "a red circle on the left and a blue square on the right" \\
        --pair red,circle --contradict "a blue circle on the left and a blue square on the right" --out out/report

writes ``out/report/report.html`` (self-contained: images embedded) and ``out/report/report.json``.
Without ``--pair`` the first colour word and its shape are used; without ``--contradict`` the prompt
with its colour swapped; without ``--classes`` the prompt and colour/shape-swapped variants.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_model(spec: str, device: str | None = None):
    """:func:`diffusion_xai.cli.load_model`, plus: a folder holding a ShapesWorld checkpoint (its
    ``training.json`` next to ``model_index.json``) gets the ShapesWorld sampling defaults."""
    from .cli import load_model as cli_load

    folder = Path(spec)
    if (folder / "model_index.json").exists() and (folder / "training.json").exists():
        from .pipeline import XAIPipeline
        from .shapesworld import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapesworld_pipeline

        pipe = load_shapesworld_pipeline(folder)
        if device is not None:
            pipe = pipe.to(device)
        return XAIPipeline(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)
    return cli_load(spec, device)


def _pair(arg: str | None) -> tuple[str, str] | None:
    if arg is None:
        return None
    words = [w.strip() for w in arg.split(",") if w.strip()]
    if len(words) != 2:
        raise ValueError(f"--pair needs two comma-separated words, e.g. red,circle; got {arg!r}")
    return words[0], words[1]


def cmd_report(a) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from .report import build_report

    pair = _pair(a.pair)
    classes = [c.strip() for c in a.classes.split(";") if c.strip()] if a.classes else None
    xp = load_model(a.model, a.device)
    r = build_report(xp, a.prompt, word_pair=pair, contradicting_caption=a.contradict, out_dir=a.out, seed=a.seed,
                     classes=classes, num_samples=a.num_samples, align_steps=a.align_steps,
                     num_inference_steps=a.steps, progress=not a.quiet)
    print(f"open {r.html_path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``diffusion-xai report "prompt" [--pair W1,W2] [--contradict CAPTION] [--out DIR]``."""
    from .report import REPORT_ALIGN_STEPS, REPORT_PID_SAMPLES

    p = subparsers.add_parser("report", help="end-to-end HTML report of one prompt (heatmaps, PID, classifier, "
                                             "inconsistency)")
    p.add_argument("prompt")
    p.add_argument("--pair", help="two comma-separated words of the prompt for the PID panel (default: its "
                                  "first colour word and shape)")
    p.add_argument("--contradict", help="a caption that contradicts the image (default: the prompt with its "
                                        "colour swapped)")
    p.add_argument("--classes", help="';'-separated candidate captions for the classifier (default: the prompt "
                                     "and colour/shape-swapped variants)")
    p.add_argument("--num-samples", type=int, default=REPORT_PID_SAMPLES, help="PID samples (4 UNet evals each)")
    p.add_argument("--align-steps", type=int, default=REPORT_ALIGN_STEPS, help="inconsistency alignment steps")
    p.add_argument("--steps", type=int, default=None, help="generation steps (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (embedded, default), 'tiny-random', or a diffusers folder / hub id")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/report", help="output folder (default out/report)")
    p.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    """Run the report subcommand alone (``python -m diffusion_xai.report_cli ...``)."""
    from .cli import standalone_main

    return standalone_main(register, ["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
