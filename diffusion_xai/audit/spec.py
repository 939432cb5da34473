"""Audit specs: a TOML file saying what to generate, how to judge it and what to compare.

A spec (see ``examples/shapesworld_audit.toml``)::

    name = "shapesworld colour bias"

    [generation]
    images_per_prompt = 200     # images of every prompt; image k of every prompt uses seed + k
    seed = 0
    steps = 20                  # optional: the model's defaults otherwise
    guidance = 4.0
    height = 64                 # optional
    width = 64
    batch_size = 32             # images per generate call

    [prompts]
    templates = ["a {shape}"]   # every template is filled with every combination of its slots
    [prompts.slots]
    shape = ["circle", "square", "triangle", "cross"]

    [attributes.color]          # what the judge reads off every image
    values = ["red", "green", "blue", "yellow", "purple", "orange"]
    target = {red = 0.5, ...}   # optional target distribution (default: uniform)
    templates = ["a {} circle"] # optional: judge prompts (diffusion / CLIP judges)

    [judge]
    kind = "oracle"             # "oracle" (ShapesWorld), "diffusion" (the model itself) or "clip"
    checkpoint = "path"         # clip only: a CLIPModel folder
    options = {}                # keyword arguments of the judge

    [[counterfactuals]]         # optional: CAS between two prompts' attribute histograms
    a = "a circle"
    b = "a triangle"

    [[pid]]                     # optional: DiffusionPID redundancy of (attribute value, concept)
    concept = "circle"
    attribute = "color"
    template = "a {value} {concept}"
    seeds = 2
    num_samples = 32

:func:`load_spec` validates everything before anything is written and names the line of the offending
key in its errors. :meth:`AuditSpec.hash` is the fingerprint the runner stores to refuse a changed spec.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

JUDGES = ("oracle", "diffusion", "clip")

_TOP = {"name", "generation", "prompts", "attributes", "judge", "counterfactuals", "pid"}
_GENERATION = {"images_per_prompt", "seed", "steps", "guidance", "height", "width", "batch_size"}
_PROMPTS = {"templates", "slots", "list"}
_ATTRIBUTE = {"values", "target", "templates"}
_JUDGE = {"kind", "checkpoint", "options", "miss_rate"}
_COUNTERFACTUAL = {"a", "b", "axis"}
_PID = {"concept", "attribute", "template", "values", "seeds", "num_samples"}


class SpecError(ValueError):
    """A bad audit spec; the message names the file, the line (when known), the bad value and what is allowed."""


@dataclass
class AttributeSpec:
    """One judged attribute: its values, the target distribution and optional judge prompt templates."""

    name: str
    values: list[str]
    target: dict[str, float]
    templates: list[str] | None = None


@dataclass
class PIDSpec:
    """DiffusionPID redundancy of ``template.format(value=v, concept=concept)`` for every value v."""

    concept: str
    attribute: str
    template: str = "a {value} {concept}"
    values: list[str] | None = None
    seeds: int = 2
    num_samples: int = 32


@dataclass
class AuditSpec:
    """A parsed, validated audit spec (see the module docstring for the file format)."""

    name: str
    prompts: list[str]
    attributes: dict[str, AttributeSpec]
    images_per_prompt: int
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    judge: str = "oracle"
    judge_checkpoint: str | None = None
    judge_options: dict[str, Any] = field(default_factory=dict)
    miss_rate: bool = True
    counterfactuals: list[tuple[str, str]] = field(default_factory=list)
    pid: list[PIDSpec] = field(default_factory=list)
    source: str = ""  # the file the spec came from (not part of the hash)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of everything that decides the rows (not the file name)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> AuditSpec:
        d = dict(d)
        d["attributes"] = {k: AttributeSpec(**v) for k, v in d["attributes"].items()}
        d["pid"] = [PIDSpec(**p) for p in d.get("pid", [])]
        d["counterfactuals"] = [tuple(c) for c in d.get("counterfactuals", [])]
        return cls(**d)

    def items(self) -> list[tuple[int, int]]:
        """Every (prompt index, sample index) of the audit, prompt-major."""
        return [(p, k) for p in range(len(self.prompts)) for k in range(self.images_per_prompt)]

    def pid_items(self) -> list[tuple[int, str, int]]:
        """Every (pid entry index, attribute value, seed) of the PID part."""
        out = []
        for j, p in enumerate(self.pid):
            for v in p.values or self.attributes[p.attribute].values:
                out += [(j, v, self.seed + s) for s in range(p.seeds)]
        return out


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """1-based line of ``key = ...`` (after the header ``[table]`` when given), or of the table header."""
    lines = text.splitlines()
    start = 0
    if table is not None:
        pat = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?\s*(#.*)?$")
        for i, line in enumerate(lines):
            if pat.match(line):
                start = i
                break
    pat = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=|^\s*\[\[?\s*(\w+\.)*" + re.escape(key) + r"\s*\]")
    for i in range(start, len(lines)):
        if pat.search(lines[i]):
            return i + 1
    return None


class _Checker:
    def __init__(self, text: str, source: str):
        self.text, self.source = text, source

    def fail(self, msg: str, key: str | None = None, table: str | None = None):
        line = _line_of(self.text, key, table) if key else None
        where = f"{self.source} line {line}" if line else self.source
        raise SpecError(f"{where}: {msg}")

    def keys(self, d: dict, allowed: set, table: str) -> None:
        for k in d:
            if k not in allowed:
                self.fail(f"unknown key {k!r} in [{table}]; allowed: {', '.join(sorted(allowed))}", k,
                          None if table == "top level" else table)

    def int_(self, d: dict, key: str, table: str, default=None, minimum: int | None = None):
        v = d.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"{key} must be an integer, got {v!r}", key, table)
        if minimum is not None and v < minimum:
            self.fail(f"{key} must be >= {minimum}, got {v}", key, table)
        return v

    def strings(self, v, key: str, table: str | None, nonempty: bool = True) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            self.fail(f"{key} must be a list of non-empty strings, got {v!r}", key, table)
        if nonempty and not v:
            self.fail(f"{key} is empty; give at least one value", key, table)
        if len(set(v)) != len(v):
            dup = sorted({s for s in v if v.count(s) > 1})
            self.fail(f"{key} holds duplicates {dup}", key, table)
        return list(v)


def _template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None


def parse_spec(text: str, source: str = "<spec>") -> AuditSpec:
    """Parse and validate spec text (TOML); raises :class:`SpecError` naming the line of a bad key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    c = _Checker(text, source)
    c.keys(raw, _TOP, "top level")
    for need in ("generation", "prompts", "attributes"):
        if need not in raw:
            c.fail(f"missing [{need}] table")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str):
        c.fail(f"name must be a string, got {name!r}", "name")

    gen = raw["generation"]
    c.keys(gen, _GENERATION, "generation")
    if "images_per_prompt" not in gen:
        c.fail("[generation] needs images_per_prompt (images of every prompt, >= 1)", "generation")
    ipp = c.int_(gen, "images_per_prompt", "generation", minimum=1)
    seed = c.int_(gen, "seed", "generation", 0, minimum=0)
    steps = c.int_(gen, "steps", "generation", None, minimum=1)
    height = c.int_(gen, "height", "generation", None, minimum=8)
    width = c.int_(gen, "width", "generation", None, minimum=8)
    batch = c.int_(gen, "batch_size", "generation", 16, minimum=1)
    guidance = gen.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0):
        c.fail(f"guidance must be a number >= 0, got {guidance!r}", "guidance", "generation")

    pr = raw["prompts"]
    c.keys(pr, _PROMPTS, "prompts")
    prompts: list[str] = []
    if "list" in pr:
        prompts += c.strings(pr["list"], "list", "prompts")
    slots = pr.get("slots", {})
    if not isinstance(slots, dict):
        c.fail(f"[prompts.slots] must be a table of slot = [values], got {slots!r}", "slots", "prompts")
    for k, v in slots.items():
        c.strings(v, k, "prompts.slots")
    if "templates" in pr:
        for t in c.strings(pr["templates"], "templates", "prompts"):
            try:
                fields = _template_fields(t)
            except ValueError as e:
                c.fail(str(e), "templates", "prompts")
            if any(not f for f in fields):
                c.fail(f"template {t!r} has an empty slot '{{}}'; name it, e.g. '{{shape}}'", "templates", "prompts")
            missing = [f for f in fields if f not in slots]
            if missing:
                c.fail(f"template {t!r} uses slot(s) {missing} with no values; give them in [prompts.slots] "
                       f"(slots given: {', '.join(slots) or 'none'})", "templates", "prompts")
            names = list(dict.fromkeys(fields))
            for combo in itertools.product(*(slots[n] for n in names)):
                prompts.append(t.format(**dict(zip(names, combo))))
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        c.fail("[prompts] gives no prompts: add templates (with [prompts.slots]) or list", "prompts")

    attrs_raw = raw["attributes"]
    if not isinstance(attrs_raw, dict) or not attrs_raw:
        c.fail("[attributes] is empty; add e.g. [attributes.color] values = [\"red\", \"blue\"]", "attributes")
    attributes: dict[str, AttributeSpec] = {}
    for a, d in attrs_raw.items():
        tbl = f"attributes.{a}"
        if isinstance(d, list):
            d = {"values": d}
        if not isinstance(d, dict):
            c.fail(f"[{tbl}] must be a table with values = [...], got {d!r}", a, "attributes")
        c.keys(d, _ATTRIBUTE, tbl)
        if "values" not in d:
            c.fail(f"[{tbl}] needs values = [...]", a)
        values = c.strings(d["values"], "values", tbl)
        if len(values) < 2:
            c.fail(f"attribute {a!r} needs at least two values, got {values}", "values", tbl)
        target = d.get("target")
        if target is None:
            target = {v: 1.0 / len(values) for v in values}
        else:
            if not isinstance(target, dict) or set(target) != set(values):
                c.fail(f"target of {a!r} must give a share for every value {values}, got {target!r}", "target", tbl)
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in target.values()) or \
                    abs(sum(target.values()) - 1) > 1e-6:
                c.fail(f"target of {a!r} must hold shares >= 0 summing to 1, got {target}", "target", tbl)
            target = {v: float(target[v]) for v in values}
        templates = d.get("templates")
        if templates is not None:
            templates = c.strings(templates, "templates", tbl)
            for t in templates:
                if t.count("{}") != 1:
                    c.fail(f"judge template {t!r} of {a!r} must hold one '{{}}' for the value", "templates", tbl)
        attributes[a] = AttributeSpec(a, values, target, templates)

    jd = raw.get("judge", {})
    c.keys(jd, _JUDGE, "judge")
    kind = jd.get("kind", "oracle")
    if kind not in JUDGES:
        c.fail(f"judge kind {kind!r} does not exist; allowed: {', '.join(JUDGES)}", "kind", "judge")
    ckpt = jd.get("checkpoint")
    if kind == "clip" and not ckpt:
        c.fail("the clip judge needs checkpoint = \"path/to/clip\" (a transformers CLIPModel folder)", "kind", "judge")
    if ckpt is not None and kind != "clip":
        c.fail(f"checkpoint is only for the clip judge, not {kind!r}", "checkpoint", "judge")
    options = jd.get("options", {})
    if not isinstance(options, dict):
        c.fail(f"judge options must be a table, got {options!r}", "options", "judge")
    miss = jd.get("miss_rate", True)
    if not isinstance(miss, bool):
        c.fail(f"miss_rate must be true or false, got {miss!r}", "miss_rate", "judge")

    cfs = []
    for cf in raw.get("counterfactuals", []):
        c.keys(cf, _COUNTERFACTUAL, "counterfactuals")
        for k in ("a", "b"):
            if k not in cf:
                c.fail(f"every [[counterfactuals]] needs a and b (two prompts), got {cf}", "counterfactuals")
            if cf[k] not in prompts:
                c.fail(f"counterfactual prompt {cf[k]!r} is not among the audit's prompts: {prompts}", k,
                       "counterfactuals")
        cfs.append((cf["a"], cf["b"]))

    pids = []
    for p in raw.get("pid", []):
        c.keys(p, _PID, "pid")
        if "concept" not in p or "attribute" not in p:
            c.fail(f"every [[pid]] needs concept and attribute, got {p}", "pid")
        if p["attribute"] not in attributes:
            c.fail(f"pid attribute {p['attribute']!r} is not among the attributes {list(attributes)}", "attribute",
                   "pid")
        tpl = p.get("template", "a {value} {concept}")
        if not isinstance(tpl, str) or set(_template_fields(tpl)) != {"value", "concept"}:
            c.fail(f"pid template must use exactly {{value}} and {{concept}}, got {tpl!r}", "template", "pid")
        vals = p.get("values")
        if vals is not None:
            vals = c.strings(vals, "values", "pid")
        pids.append(PIDSpec(p["concept"], p["attribute"], tpl, vals, c.int_(p, "seeds", "pid", 2, minimum=1),
                            c.int_(p, "num_samples", "pid", 32, minimum=1)))

    return AuditSpec(name=name, prompts=prompts, attributes=attributes, images_per_prompt=ipp, seed=seed,
                     steps=steps, guidance=None if guidance is None else float(guidance), height=height,
                     width=width, batch_size=batch, judge=kind, judge_checkpoint=ckpt, judge_options=dict(options),
                     miss_rate=miss, counterfactuals=cfs, pid=pids, source=source)


def load_spec(path: str | Path) -> AuditSpec:
    """Read and validate a spec file (see :func:`parse_spec`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audit spec {path} does not exist")
    return parse_spec(path.read_text(), str(path))
