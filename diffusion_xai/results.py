"""Shared save/load for result dataclasses: tensors in safetensors, metadata in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_result(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict, kind: str) -> Path:
    """Write ``tensors.safetensors`` and ``meta.json`` (with ``kind``) into ``folder``.

    Files are written to temporary names first and renamed, so an interrupted save never
    leaves a half-written result over a good one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_m = folder / "tensors.safetensors.tmp", folder / "meta.json.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_t))
    tmp_m.write_text(json.dumps({"kind": kind, **meta}, indent=2))
    tmp_t.replace(folder / "tensors.safetensors")
    tmp_m.replace(folder / "meta.json")
    return folder


def load_result(folder: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no saved result in {folder} (missing meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r} result, not {kind!r}")
    return load_file(str(folder / "tensors.safetensors")), meta
