"""``diffusion-xai generate``: generate with text-embedding tweaks, side by side with the plain image.

Example::

    diffusion-xai generate "a red circle and a blue square" --tweak cbs:circle,square --tweak nms --out out/

writes ``out/grid.png`` (one row per seed: plain | tweaked, same seed), the single images
``plain_<seed>.png`` / ``tweaked_<seed>.png`` and ``tweaks.json``.

Tweak specs (``--tweak``, repeatable, applied in the order given)::

    cbs:WORD[,WORD...][:alpha=A,gamma=G,threshold=T]     CorrectionBySimilarities
    nms[:WORD,...][:alpha=A,sigma=S,until_step=N]         CrossTokenNMS (no words: every prompt token)
    reweight:WORD=FACTOR                                  Reweight
    remove:WORD[:alpha=A]                                 Remove
    swap:WORD=OTHER[:alpha=A]                             Swap
    interpolate:WORD=OTHER:t=T                            Interpolate
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .tweaks import CorrectionBySimilarities, CrossTokenNMS, Interpolate, Remove, Reweight, Swap, Tweak

KINDS = ("cbs", "nms", "reweight", "remove", "swap", "interpolate")
_OPTIONS = {"cbs": {"alpha": float, "gamma": int, "threshold": float},
            "nms": {"alpha": float, "sigma": float, "until_step": int},
            "reweight": {}, "remove": {"alpha": float}, "swap": {"alpha": float}, "interpolate": {"t": float}}


def _parse_options(kind: str, text: str, spec: str) -> dict:
    allowed = _OPTIONS[kind]
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValueError(f"tweak {spec!r}: unknown option {item!r}; {kind} takes "
                             f"{', '.join(f'{k}=...' for k in allowed) or 'no options'}")
        try:
            out[key] = allowed[key](value.strip())
        except ValueError:
            raise ValueError(f"tweak {spec!r}: option {key} must be a {allowed[key].__name__}, "
                             f"got {value.strip()!r}") from None
    return out


def _is_options(kind: str, text: str) -> bool:
    items = [s.strip() for s in text.split(",") if s.strip()]
    return bool(items) and all(s.partition("=")[0].strip() in _OPTIONS[kind] and "=" in s for s in items)


def _pair(kind: str, text: str, spec: str, second: str) -> tuple[str, str]:
    word, sep, other = text.partition("=")
    if not sep or not word.strip() or not other.strip():
        raise ValueError(f"tweak {spec!r}: {kind} needs WORD={second}, e.g. {kind}:red={'2' if kind == 'reweight' else 'blue'}")
    return word.strip(), other.strip()


def parse_tweak(spec: str) -> Tweak:
    """A tweak object from a command-line spec (see the module docstring); clear errors otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"tweak spec must be a non-empty string, got {spec!r}")
    parts = spec.strip().split(":")
    kind = parts[0].strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown tweak {kind!r} in {spec!r}; allowed: {', '.join(KINDS)}")
    args = parts[1:]
    if len(args) > 2:
        raise ValueError(f"tweak {spec!r} has {len(parts)} ':'-separated parts; use KIND[:ARGS][:OPTIONS]")
    if len(args) == 1 and _is_options(kind, args[0]) and kind in ("nms",):
        args = ["", args[0]]
    main = args[0].strip() if args else ""
    opts = _parse_options(kind, args[1], spec) if len(args) == 2 else {}
    words = [w.strip() for w in main.split(",") if w.strip()]
    if kind == "cbs":
        if not words:
            raise ValueError(f"tweak {spec!r}: cbs needs concept words, e.g. cbs:red,circle")
        return CorrectionBySimilarities(words, **opts)
    if kind == "nms":
        return CrossTokenNMS(words or None, **opts)
    if kind == "reweight":
        word, factor = _pair(kind, main, spec, "FACTOR")
        try:
            value = float(factor)
        except ValueError:
            raise ValueError(f"tweak {spec!r}: the reweight factor must be a number, got {factor!r}") from None
        return Reweight(word, value)
    if kind == "remove":
        if len(words) != 1:
            raise ValueError(f"tweak {spec!r}: remove takes one word, e.g. remove:red")
        return Remove(words[0], **opts)
    word, other = _pair(kind, main, spec, "OTHER")
    if kind == "swap":
        return Swap(word, other, **opts)
    if "t" not in opts:
        raise ValueError(f"tweak {spec!r}: interpolate needs t, e.g. interpolate:red=blue:t=0.5")
    return Interpolate(word, other, opts["t"])


def side_by_side(rows: list[tuple[Image.Image, Image.Image]], min_size: int = 256, gap: int = 4) -> Image.Image:
    """A grid PNG: one row per pair (plain | tweaked), images enlarged (nearest) to >= ``min_size`` px."""
    w, h = rows[0][0].size
    scale = max(1, -(-min_size // max(w, h)))
    W, H = w * scale, h * scale
    grid = Image.new("RGB", (2 * W + gap, len(rows) * H + (len(rows) - 1) * gap), (255, 255, 255))
    for r, (a, b) in enumerate(rows):
        y = r * (H + gap)
        grid.paste(a.convert("RGB").resize((W, H), Image.NEAREST), (0, y))
        grid.paste(b.convert("RGB").resize((W, H), Image.NEAREST), (W + gap, y))
    return grid


def cmd_generate(a) -> int:
    """Run ``diffusion-xai generate``: writes grid.png, plain_<seed>.png, tweaked_<seed>.png, tweaks.json."""
    from .cli import load_model
    from .tweaks import generate_with_tweaks

    tweaks = [parse_tweak(s) for s in (a.tweak or [])]
    if not tweaks:
        raise ValueError("give at least one --tweak, e.g. --tweak cbs:red,circle --tweak nms")
    if a.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {a.num_images}")
    xp = load_model(a.model, a.device)
    kw = dict(num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height, width=a.width,
              progress=False)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for seed in range(a.seed, a.seed + a.num_images):
        plain = xp.generate(a.prompt, seed=seed, **kw).images[0]
        tweaked = generate_with_tweaks(xp, a.prompt, tweaks, seed=seed, **kw).images[0]
        for name, im in (("plain", plain), ("tweaked", tweaked)):
            p = out / f"{name}_{seed}.png"
            im.save(p)
            files.append(str(p))
        rows.append((plain, tweaked))
    side_by_side(rows).save(out / "grid.png")
    summary = {"prompt": a.prompt, "tweaks": [repr(t) for t in tweaks], "specs": list(a.tweak),
               "seeds": list(range(a.seed, a.seed + a.num_images)), "model": a.model,
               "columns": ["plain", "tweaked"], "files": files, "grid": str(out / "grid.png")}
    (out / "tweaks.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'grid.png'} ({a.num_images} row(s): plain | tweaked) and {out / 'tweaks.json'}")
    return 0


def register(subparsers) -> None:
    """Add ``diffusion-xai generate "prompt" --tweak cbs:red,circle --tweak nms --out DIR``."""
    p = subparsers.add_parser("generate", help="generate with text-embedding tweaks (T2I-Zero), plain | tweaked grid")
    p.add_argument("prompt")
    p.add_argument("--tweak", action="append", metavar="SPEC",
                   help="repeatable, applied in order: cbs:WORDS[:alpha=,gamma=,threshold=], "
                        "nms[:WORDS][:alpha=,sigma=,until_step=], reweight:WORD=FACTOR, remove:WORD[:alpha=], "
                        "swap:WORD=OTHER[:alpha=], interpolate:WORD=OTHER:t=T")
    p.add_argument("--num-images", type=int, default=1, help="rows of the grid: seeds SEED..SEED+N-1")
    from .cli import add_common_options, add_generation_options

    add_generation_options(p)
    add_common_options(p)
    p.set_defaults(func=cmd_generate)
