"""``diffusion-xai erase``: erase concepts into a LoRA folder (and optionally measure Acc_e / Acc_s / Acc_g / H).

Example::

    diffusion-xai erase circle --preserve square,triangle --out edits/no-circle --evaluate

writes ``edits/no-circle`` (diffusers LoRA format + ``edit.json``; ``pipe.load_lora_weights`` loads it) and,
with ``--evaluate`` on the ShapesWorld model, prints the oracle's metrics before and after the edit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLI_METHODS = ("closed_form", "neighbors", "finetune")


def _list(arg: str | None) -> list[str]:
    return [w.strip() for w in arg.split(",") if w.strip()] if arg else []


def _templates(a, xp_is_shapesworld: bool, concepts: list[str]) -> list[str]:
    if a.templates:
        return [t for t in a.templates.split("|") if t]
    if xp_is_shapesworld:
        from .erasure import shapesworld_templates

        try:
            out = []
            for c in concepts:
                out += [t for t in shapesworld_templates(c) if t not in out]
            return out
        except ValueError:
            pass
    return ["{}"]


def cmd_erase(a) -> int:
    from .cli import load_model
    from .erasure import erase, evaluate_shapesworld

    xp = load_model(a.model, a.device)
    concepts = _list(a.concepts)
    if not concepts:
        raise ValueError(f"give at least one concept to erase, got {a.concepts!r}")
    preserve = _list(a.preserve)
    templates = _templates(a, a.model == "shapesworld", concepts)
    if a.evaluate and a.model != "shapesworld":
        raise ValueError(f"--evaluate judges images with the ShapesWorld oracle; it needs --model shapesworld, "
                         f"got {a.model!r}")
    before = {}
    if a.evaluate:
        before = {c: evaluate_shapesworld(xp, c, num_samples=a.num_samples, seed=a.seed) for c in concepts}
    kwargs = dict(preserve=preserve, guide=a.guide, method=a.method, lam=a.lam, erase_scale=a.erase_scale,
                  preserve_scale=a.preserve_scale, token_positions=a.token_positions, templates=templates,
                  seed=a.seed)
    if a.method == "neighbors":
        kwargs.update(num_neighbors=a.num_neighbors, d1=a.d1, s1=a.s1, s2=a.s2)
    if a.method == "finetune":
        kwargs.update(steps=a.steps, lr=a.lr, eta=a.eta, rank=a.rank, resume_from=a.resume_from)
    edit = erase(xp, concepts, **kwargs)
    out = Path(a.out)
    edit.save(out)
    summary = {**edit.to_dict(), "model": a.model, "out": str(out)}
    summary.pop("history", None)
    if a.evaluate:
        after = {c: evaluate_shapesworld(xp, c, num_samples=a.num_samples, seed=a.seed) for c in concepts}
        summary["evaluation"] = {"before": before, "after": after}
        print(f"{'concept':10} {'':7} {'Acc_e':>6} {'Acc_s':>6} {'Acc_g':>6} {'H':>6}")
        for c in concepts:
            for label, m in (("before", before[c]), ("after", after[c])):
                print(f"{c:10} {label:7} {m['acc_e']:6.3f} {m['acc_s']:6.3f} {m['acc_g']:6.3f} {m['H']:6.3f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"erased {concepts} ({a.method}, rank {edit.rank}, {edit.edit_time_s:.2f} s); wrote {out}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``erase`` subcommand to ``diffusion-xai``'s subparsers."""
    e = subparsers.add_parser("erase", help="erase concepts from the UNet into a LoRA folder (UCE / RealEra / ESD)")
    e.add_argument("concepts", help="comma-separated concepts to erase, e.g. circle or 'circle,red'")
    e.add_argument("--preserve", help="comma-separated concepts to keep")
    e.add_argument("--guide", default="", help="what the concepts become (default: '' = the empty prompt)")
    e.add_argument("--method", default="closed_form", choices=CLI_METHODS)
    e.add_argument("--lam", type=float, default=0.5, help="closeness to the base weights (> 0)")
    e.add_argument("--erase-scale", type=float, default=1.0)
    e.add_argument("--preserve-scale", type=float, default=1.0)
    e.add_argument("--token-positions", default="last", choices=("last", "word_to_eos"))
    e.add_argument("--templates", help="'|'-separated contexts with one {} each (default: ShapesWorld contexts "
                                       "for ShapesWorld words, else '{}')")
    e.add_argument("--num-neighbors", type=int, default=16, help="neighbors: mined neighbours per vector")
    e.add_argument("--d1", type=float, default=0.5, help="neighbors: distance bound relative to ||e||")
    e.add_argument("--s1", type=float, default=0.85, help="neighbors: lowest cosine")
    e.add_argument("--s2", type=float, default=0.98, help="neighbors: highest cosine")
    e.add_argument("--steps", type=int, default=200, help="finetune: total optimiser steps")
    e.add_argument("--lr", type=float, default=1e-3, help="finetune: learning rate")
    e.add_argument("--eta", type=float, default=2.0, help="finetune: negative guidance strength")
    e.add_argument("--rank", type=int, default=4, help="finetune: LoRA rank")
    e.add_argument("--resume-from", default=None, help="finetune: a saved finetune edit to continue")
    e.add_argument("--evaluate", action="store_true", help="print Acc_e/Acc_s/Acc_g/H before and after (ShapesWorld)")
    e.add_argument("--num-samples", type=int, default=4, help="--evaluate: images per prompt")
    e.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (embedded, default), 'tiny-random', or a diffusers folder / hub id")
    e.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="out", help="output folder (the LoRA)")
    e.set_defaults(func=cmd_erase)
    return e


if __name__ == "__main__":  # standalone use until the lead wires register() into cli.py
    parser = argparse.ArgumentParser(prog="diffusion-xai")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    try:
        sys.exit(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
