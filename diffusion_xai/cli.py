"""Command line: ``diffusion-xai SUBCOMMAND ...`` (run ``diffusion-xai -h``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_model(spec: str, device: str | None = None):
    """``shapesworld`` (the embedded model, default), ``tiny-random`` (a tiny random SD, for smoke
    runs) or a local folder / hub id of a diffusers pipeline."""
    from .pipeline import XAIPipeline

    if spec == "shapesworld":
        return XAIPipeline.shapesworld(device=device)
    if spec == "tiny-random":
        from .testing import tiny_pipeline

        print("note: using a tiny RANDOM model: its maps mean nothing (for smoke tests only)", file=sys.stderr)
        return XAIPipeline(tiny_pipeline("sd1"), default_steps=4)
    return XAIPipeline.from_pretrained(spec, device=device)


def _words(arg: str | None) -> list[str] | None:
    return [w.strip() for w in arg.split(",") if w.strip()] if arg else None


def cmd_heatmap(a) -> int:
    import matplotlib

    matplotlib.use("Agg")
    xp = load_model(a.model, a.device)
    words = _words(a.words)
    res = xp.heatmaps(a.prompt, seed=a.seed, num_inference_steps=a.steps, guidance_scale=a.guidance,
                      height=a.height, width=a.width, num_images_per_prompt=a.images_per_prompt, words=words)
    out = Path(a.out)
    res.save(out / "result")
    files = []
    for i in range(len(res.images)):
        ws = words or [w for w in dict.fromkeys(res.words[i]) if w.isalnum()]
        res.images[i].save(out / f"image_{i}.png")
        for w in ws:
            p = out / f"image_{i}_{w}.png"
            res.overlay(w, i).resize(res.images[i].size).save(p)
            files.append(str(p))
        fig = res.plot(i, ws)
        fig.savefig(out / f"heatmaps_{i}.png", dpi=120)
        files.append(str(out / f"heatmaps_{i}.png"))
    summary = {**res.to_dict(), "files": files, "model": a.model}
    summary.pop("tokens", None)
    (out / "heatmaps.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(files)} images and {out / 'heatmaps.json'}")
    return 0


def add_generation_options(sp) -> None:
    """--steps, --guidance, --height, --width: the sampling options every generating subcommand takes."""
    sp.add_argument("--steps", type=int, default=None)
    sp.add_argument("--guidance", type=float, default=None)
    sp.add_argument("--height", type=int, default=None)
    sp.add_argument("--width", type=int, default=None)


def add_common_options(sp) -> None:
    """--model, --device, --seed, --out: the same names in every subcommand."""
    sp.add_argument("--model", default="shapesworld",
                    help="'shapesworld' (embedded, default), 'tiny-random', or a diffusers folder / hub id")
    sp.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="out", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-xai", description="Explain and edit Stable Diffusion.")
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("heatmap", help="token heatmaps (DAAM) of a generated image")
    h.add_argument("prompt")
    h.add_argument("--words", help="comma-separated words to map (default: every content word)")
    h.add_argument("--images-per-prompt", type=int, default=1)
    add_generation_options(h)
    add_common_options(h)
    h.set_defaults(func=cmd_heatmap)

    from .information import register as register_pid

    register_pid(sub)
    from .erasure_cli import register as register_erase

    register_erase(sub)
    from .tweaks_cli import register as register_tweaks

    register_tweaks(sub)
    from .classify_cli import register as register_classify

    register_classify(sub)
    from .inconsistency_cli import register as register_localize

    register_localize(sub)
    from .audit.cli import register as register_audit

    register_audit(sub)
    from .report_cli import register as register_report

    register_report(sub)
    from .demo_cli import register as register_demo

    register_demo(sub)
    return p


def run_command(args) -> int:
    """Run a parsed subcommand; bad input becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def standalone_main(register, argv=None) -> int:
    """Entry point of one module's subcommands alone (e.g. for ``accelerate launch -m``)."""
    p = argparse.ArgumentParser(prog="diffusion-xai")
    register(p.add_subparsers(dest="command", required=True))
    return run_command(p.parse_args(argv))


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
