"""diffusion-xai: explain and edit Stable Diffusion, proven against ground truth (ShapesWorld)."""

from .classifier import ClassificationResult, DiffusionJudge
from .erasure import Edit, erase
from .heatmaps import HeatmapResult
from .hooks import ActivationPatcher, ActivationRecorder, AttentionEditor, AttentionRecorder, HookManager
from .inconsistency import InconsistencyResult
from .information import InformationResult, PIDResult
from .pipeline import PromptEmbeddings, XAIPipeline
from .tweaks import CorrectionBySimilarities, CrossTokenNMS, Interpolate, Remove, Reweight, Swap

__version__ = "0.1.0"
__all__ = ["ActivationPatcher", "CorrectionBySimilarities", "CrossTokenNMS", "Interpolate", "Remove", "Reweight", "Swap", "ActivationRecorder", "AttentionEditor", "AttentionRecorder", "ClassificationResult", "DiffusionJudge", "Edit", "HeatmapResult",
           "HookManager", "InconsistencyResult", "InformationResult", "PIDResult", "PromptEmbeddings", "XAIPipeline", "erase"]
