"""ShapesWorld: a procedural world with exact ground truth, its oracle, and the embedded model."""

from __future__ import annotations

from pathlib import Path

from .oracle import DetectedObject, degrade, judge, same_objects
from .scene import (
    BIASES,
    COLORS,
    CONTROL_SHAPE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    attribute_distribution,
    sample_scene,
    scene_from_prompt,
)

MODEL_DIR = Path(__file__).parent / "model"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.5

__all__ = ["BIASES", "COLORS", "CONTROL_SHAPE", "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "MODEL_DIR", "POSITIONS",
           "SHAPES", "SIZES", "DetectedObject", "Scene", "attribute_distribution", "degrade", "judge",
           "load_shapesworld_pipeline", "same_objects", "sample_scene", "scene_from_prompt"]


def load_shapesworld_pipeline(path: str | Path | None = None, torch_dtype=None):
    """The embedded ShapesWorld ``StableDiffusionPipeline``, loaded offline from the package files."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else MODEL_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"no ShapesWorld model in {folder}; train one with `python -m diffusion_xai.shapesworld.train`")
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False, **kwargs)
    pipe.set_progress_bar_config(leave=False)
    return pipe
