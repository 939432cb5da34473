"""Settings fitted on held-out data, stored as JSON next to the model they were fitted for.

A model folder (the ``from_pretrained`` directory) may hold one ``<method>_calibration.json`` per method:
a table of entries keyed by the settings they depend on (e.g. the classifier's loss, or D-TIIL's
alignment schedule). Methods read the entry matching their call and fall back to documented defaults
when there is none, so a calibration never applies to settings it was not fitted under.
"""

from __future__ import annotations

import json
from pathlib import Path


def model_folder(xp) -> Path | None:
    """The folder ``xp``'s diffusers pipeline was loaded from, or None (built in memory, or from the hub cache)."""
    name = getattr(xp.pipe, "name_or_path", None) or xp.pipe.config.get("_name_or_path")
    return Path(name) if name and Path(name).is_dir() else None


def save_entry(folder: str | Path, filename: str, key: str, **values) -> Path:
    """Store ``values`` under ``key`` in ``folder/filename`` (other keys kept); returns the file."""
    path = Path(folder) / filename
    if not path.parent.is_dir():
        raise ValueError(f"calibration folder {str(path.parent)!r} does not exist; give the model's folder")
    table = json.loads(path.read_text()) if path.exists() else {}
    table[key] = values
    path.write_text(json.dumps(table, indent=2))
    return path


def load_entry(xp, filename: str, key: str) -> dict | None:
    """The entry ``key`` of ``filename`` in ``xp``'s model folder, or None when there is none."""
    folder = model_folder(xp)
    if folder is None or not (folder / filename).exists():
        return None
    return json.loads((folder / filename).read_text()).get(key)
