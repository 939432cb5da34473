"""``diffusion-xai demo [--model M] [--port P] [--host H]``: start the Gradio app (``demos/app.py``).

The app lives in the repository's ``demos/`` folder (it needs the ``demo`` extra: gradio), so this
command works from a source checkout / editable install.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

APP_PATH = Path(__file__).resolve().parents[1] / "demos" / "app.py"


def load_app_module(path: Path = APP_PATH):
    """Import ``demos/app.py`` as the module ``diffusion_xai_demo_app``; clear errors when it (or gradio) is missing."""
    if not path.exists():
        raise FileNotFoundError(f"the demo app is not at {path}; run the demo from a source checkout "
                                "(git clone ...; pip install -e '.[demo]')")
    if importlib.util.find_spec("gradio") is None:
        raise FileNotFoundError("the demo needs gradio: pip install -e '.[demo]' (or pip install gradio)")
    spec = importlib.util.spec_from_file_location("diffusion_xai_demo_app", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_demo(a) -> int:
    mod = load_app_module()
    argv = ["--model", a.model, "--host", a.host, "--port", str(a.port)]
    return mod.main(argv)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``diffusion-xai demo`` to the CLI's subparsers."""
    p = subparsers.add_parser("demo", help="start the Gradio app (one tab per method) on localhost")
    p.add_argument("--model", default="shapesworld",
                   help="'shapesworld' (embedded, default), 'tiny-random', a ShapesWorld checkpoint folder, "
                        "or a diffusers folder / hub id")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_demo)
    return p
