"""``diffusion-xai audit run SPEC --out DIR`` and ``diffusion-xai audit report DIR``.

    diffusion-xai audit run examples/shapesworld_audit.toml --out runs/audit
    accelerate launch --multi_gpu --num_processes 2 -m diffusion_xai.audit.cli audit run SPEC --out runs/audit
    diffusion-xai audit report runs/audit           # report.html, report.json, report.csv

``audit run`` resumes an interrupted run in the same folder and refuses a folder made by another spec.
``--model renders`` audits the ShapesWorld generator process itself (no model): the ground truth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_run(a) -> int:
    import torch
    from accelerate import PartialState

    from .runner import render_generator, run_audit
    from .spec import load_spec

    spec = load_spec(a.spec)  # validated before anything is written
    state = PartialState(cpu=a.device == "cpu" or not torch.cuda.is_available())
    xp, generator = None, None
    if a.model == "renders":
        generator = render_generator()
    else:
        from ..cli import load_model

        xp = load_model(a.model, a.device or (None if state.device.type == "cpu" else str(state.device)))
    res = run_audit(spec, a.out, xp=xp, generator=generator, progress=not a.quiet, state=state)
    if state.is_main_process:
        print(json.dumps(res))
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    s = write_report(a.out, grids=not a.no_grids)
    out = Path(a.out)
    print(json.dumps({"images": s["images"], "complete": s["complete"], "attributes": s["attributes"]}, indent=2))
    print(f"wrote {out / 'report.html'}, {out / 'report.json'} and {out / 'report.csv'}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``audit run`` and ``audit report`` to the ``diffusion-xai`` sub-command parser."""
    p = subparsers.add_parser("audit", help="scripted bias audits: run a TOML spec, then report")
    sub = p.add_subparsers(dest="audit_command", required=True)
    r = sub.add_parser("run", help="generate, judge and store (resumable; shards under `accelerate launch`)")
    r.add_argument("spec", help="the audit spec (TOML), e.g. examples/shapesworld_audit.toml")
    r.add_argument("--out", required=True, help="audit folder (rerun with the same folder to resume)")
    r.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (embedded, default), 'tiny-random', 'renders' (the ShapesWorld generator "
                        "process, no model), or a diffusers folder / hub id")
    r.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    q = sub.add_parser("report", help="write report.html, report.json and report.csv of an audit folder")
    q.add_argument("out", help="the audit folder")
    q.add_argument("--no-grids", action="store_true", help="leave the image grids out of report.html")
    q.set_defaults(func=cmd_report)


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m diffusion_xai.audit.cli audit ...``), e.g. for ``accelerate launch -m``."""
    from ..cli import standalone_main

    return standalone_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
