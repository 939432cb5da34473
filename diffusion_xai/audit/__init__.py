"""Scripted bias audits: a TOML spec, a resumable sharded runner on SQLite, judges, metrics and reports."""

from .judges import CLIPJudge, Judge, ModelJudge, OracleJudge, Verdict, make_judge
from .metrics import (
           cas,
           chi_square,
           distribution_bias,
           jaccard_hallucination,
           summarize,
           total_variation,
           uce_delta,
           wilson_interval,
)
from .report import write_report
from .runner import SpecChangedError, load_rows, model_generator, read_spec, render_generator, run_audit
from .spec import AuditSpec, SpecError, load_spec, parse_spec

__all__ = ["AuditSpec", "CLIPJudge", "Judge", "ModelJudge", "OracleJudge", "SpecChangedError", "SpecError", "Verdict",
           "cas", "chi_square", "distribution_bias", "jaccard_hallucination", "load_rows", "load_spec",
           "make_judge", "model_generator", "parse_spec", "read_spec", "render_generator", "run_audit", "summarize",
           "total_variation", "uce_delta", "wilson_interval", "write_report"]
