"""The resumable audit runner: generate, judge, store one SQLite row per image as it finishes.

Layout of an audit folder::

    runs/x/audit.db           SQLite (WAL): table meta (spec, spec hash), images (one row per image),
                              pid (one row per PID analysis)
    runs/x/spec.json          the parsed spec
    runs/x/images/P/S.png     image of prompt index P, sample index S (seed = spec.seed + S)

Work is the list of (prompt index, sample index) pairs. Every process of ``accelerate launch`` takes the
pairs ``items[rank::num_processes]`` of the *full* list (so the split never depends on what is done), skips
those already in the database and writes its own rows (WAL journal, retries on a busy database). A row is
written only after its PNG, in one transaction per batch, so a kill at any moment loses at most the batch
in flight and a rerun redoes exactly the missing pairs (``INSERT OR IGNORE`` on the primary key makes a
duplicate impossible). A run folder remembers the hash of its spec; a different spec is refused.

Every image has its own seed: its initial latent is drawn from ``torch.Generator().manual_seed(seed)``, so
an image does not depend on the batch it was generated in, nor on the number of processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from .judges import Judge, make_judge
from .spec import AuditSpec

Generator = Callable[[Sequence[str], Sequence[int]], list]  # (prompts, seeds) -> PIL images

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    prompt_index INTEGER NOT NULL, sample INTEGER NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    path TEXT NOT NULL, labels TEXT NOT NULL, detected TEXT NOT NULL, miss INTEGER,
    process INTEGER NOT NULL, seconds REAL NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (prompt_index, sample));
CREATE TABLE IF NOT EXISTS pid (
    entry INTEGER NOT NULL, value TEXT NOT NULL, seed INTEGER NOT NULL, concept TEXT NOT NULL,
    attribute TEXT NOT NULL, prompt TEXT NOT NULL, scalars TEXT NOT NULL, unet_evals INTEGER NOT NULL,
    process INTEGER NOT NULL, seconds REAL NOT NULL, PRIMARY KEY (entry, value, seed));
"""


class SpecChangedError(ValueError):
    """The spec differs from the one an existing audit folder was started with."""


def connect(db: str | Path) -> sqlite3.Connection:
    """Open the audit database (WAL journal, 60 s busy timeout, autocommit off)."""
    con = sqlite3.connect(str(db), timeout=60.0)
    _retry(lambda: con.execute("PRAGMA journal_mode=WAL"))
    con.execute("PRAGMA busy_timeout=60000")
    return con


def _retry(fn, tries: int = 20):
    for k in range(tries):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or k == tries - 1:
                raise
            time.sleep(0.05 * (k + 1))


def _write(con: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
    def go():
        with con:  # one transaction: all rows of the batch or none
            con.executemany(sql, rows)
    _retry(go)


def image_path(prompt_index: int, sample: int) -> str:
    """Path of an image, relative to the audit folder."""
    return f"images/{prompt_index:04d}/{sample:06d}.png"


def model_generator(xp, spec: AuditSpec) -> Generator:
    """Generate with ``xp`` at the spec's steps/guidance/size; image i starts from its own seeded latent."""
    f = xp.vae_scale_factor
    size = xp.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    h, w = spec.height or size * f, spec.width or size * f
    channels = xp.unet.config.in_channels

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list:
        lat = torch.cat([torch.randn((1, channels, h // f, w // f), generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
        out = xp.generate(list(prompts), seed=int(seeds[0]), num_inference_steps=spec.steps,
                          guidance_scale=spec.guidance, height=h, width=w,
                          latents=lat.to(xp.device, xp.dtype), progress=False)
        return list(out.images)
    return generate


def render_generator() -> Generator:
    """The ShapesWorld *generator process* itself (no model): ``scene_from_prompt(prompt, seed)``, whose
    unmentioned attributes are drawn from the injected :data:`~diffusion_xai.shapesworld.BIASES`. Auditing it
    must recover the true biases: the reference an audited model is compared with. The scene seed mixes
    the image seed with the prompt (CRC-32), so different prompts draw independent scenes."""
    import zlib

    import numpy as np

    from ..shapesworld import scene_from_prompt

    def generate(prompts, seeds):
        out = []
        for p, s in zip(prompts, seeds):
            scene_seed = int(np.random.SeedSequence([int(s), zlib.crc32(p.encode())]).generate_state(1)[0])
            out.append(Image.fromarray(scene_from_prompt(p, seed=scene_seed).image))
        return out
    return generate


def _init_store(out: Path, spec: AuditSpec) -> None:
    """Create the folder and database, or check that an existing one was made by the same spec."""
    out.mkdir(parents=True, exist_ok=True)
    con = connect(out / "audit.db")
    try:
        with con:
            con.executescript(SCHEMA)
        row = con.execute("SELECT value FROM meta WHERE key='spec_hash'").fetchone()
        if row is None:
            _write(con, "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                   [("spec_hash", spec.hash()), ("spec", json.dumps(spec.to_dict())), ("created", str(time.time()))])
            (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    finally:
        con.close()


def _check_spec(out: Path, spec: AuditSpec) -> None:
    con = connect(out / "audit.db")
    try:
        row = con.execute("SELECT value FROM meta WHERE key='spec_hash'").fetchone()
        old = con.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
    finally:
        con.close()
    if row is None:
        raise RuntimeError(f"{out / 'audit.db'} has no spec hash; was it created by another tool?")
    if row[0] != spec.hash():
        old_d, new_d = json.loads(old[0]), spec.to_dict()
        changed = sorted(k for k in set(old_d) | set(new_d) if old_d.get(k) != new_d.get(k))
        raise SpecChangedError(
            f"{out} was started with a different spec (changed: {', '.join(changed)}); refusing to mix rows of two "
            f"specs. Rerun with the original spec ({out / 'spec.json'}) or choose a new --out folder")


def read_spec(out: str | Path) -> AuditSpec:
    """The spec an audit folder was started with."""
    db = Path(out) / "audit.db"
    if not db.exists():
        raise FileNotFoundError(f"{out} holds no audit (no audit.db); run `diffusion-xai audit run` first")
    con = connect(db)
    try:
        row = con.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
    finally:
        con.close()
    return AuditSpec.from_dict(json.loads(row[0]))


def _select(out: str | Path, sql: str) -> list[dict]:
    """Rows of a query on an audit folder's database, as dicts."""
    con = connect(Path(out) / "audit.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def load_rows(out: str | Path) -> list[dict]:
    """Every image row of an audit folder, ordered by (prompt index, sample), JSON columns decoded."""
    rows = _select(out, "SELECT * FROM images ORDER BY prompt_index, sample")
    for r in rows:
        r["labels"] = json.loads(r["labels"])
        r["detected"] = json.loads(r["detected"])
        r["miss"] = None if r["miss"] is None else bool(r["miss"])
    return rows


def load_pid_rows(out: str | Path) -> list[dict]:
    """Every PID row of an audit folder, ordered by (entry, value, seed), scalars decoded."""
    rows = _select(out, "SELECT * FROM pid ORDER BY entry, value, seed")
    for r in rows:
        r["scalars"] = json.loads(r["scalars"])
    return rows


def run_audit(spec: AuditSpec, out: str | Path, xp=None, generator: Generator | None = None,
              judge: Judge | None = None, progress: bool = True, state=None) -> dict:
    """Run (or resume) an audit into the folder ``out``; returns {"images", "done_now", "seconds", ...}.

    Args:
        spec: the parsed spec (:func:`~diffusion_xai.audit.spec.load_spec`).
        out: the audit folder (created; an existing one must hold the same spec).
        xp: the :class:`~diffusion_xai.XAIPipeline` audited (needed unless ``generator`` is given, and for the
            diffusion judge and PID).
        generator: ``(prompts, seeds) -> PIL images`` overriding the model (e.g. :func:`render_generator`).
        judge: overrides the spec's judge.
        progress: tqdm bar (with ETA) on the local main process.
        state: an accelerate ``PartialState`` (default: the current one); work is sharded over its processes.
    Raises:
        SpecChangedError: ``out`` was started with another spec.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    out = Path(out)
    state = state or PartialState()
    if generator is None:
        if xp is None:
            raise ValueError("give xp (the model to audit) or a generator")
        generator = model_generator(xp, spec)
    if spec.pid and xp is None:
        raise ValueError("the spec asks for PID word pairs, which need the model: pass xp")
    judge = judge or make_judge(spec, xp)  # a judge that cannot be made fails before anything is written
    if state.is_main_process:
        _init_store(out, spec)
    state.wait_for_everyone()
    _check_spec(out, spec)
    rank, world = state.process_index, state.num_processes

    con = connect(out / "audit.db")
    t_start = time.perf_counter()
    done_now = 0
    try:
        mine = spec.items()[rank::world]
        done = set(con.execute("SELECT prompt_index, sample FROM images").fetchall())
        pending = [it for it in mine if it not in done]
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"audit {spec.name} [{rank}]",
                   unit="img", disable=not progress or not state.is_local_main_process, dynamic_ncols=True)
        for s in range(0, len(pending), spec.batch_size):
            batch = pending[s:s + spec.batch_size]
            t0 = time.perf_counter()
            prompts = [spec.prompts[p] for p, _ in batch]
            seeds = [spec.seed + k for _, k in batch]
            images = generator(prompts, seeds)
            if len(images) != len(batch):
                raise ValueError(f"the generator returned {len(images)} images for {len(batch)} prompts")
            verdicts = judge(images, prompts, spec.attributes, miss_rate=spec.miss_rate)
            secs = (time.perf_counter() - t0) / len(batch)
            rows = []
            for (p, k), prompt, seed, im, v in zip(batch, prompts, seeds, images, verdicts):
                rel = image_path(p, k)
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                tmp = out / (rel + f".tmp{rank}")
                im.save(tmp, format="PNG")
                os.replace(tmp, out / rel)
                rows.append((p, k, prompt, seed, rel, json.dumps(v.labels, sort_keys=True), json.dumps(v.detected),
                             None if v.miss is None else int(v.miss), rank, secs, time.time()))
            _write(con, "INSERT OR IGNORE INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            done_now += len(rows)
            bar.update(len(rows))
        bar.close()

        if spec.pid:
            pid_mine = spec.pid_items()[rank::world]
            pid_done = set(con.execute("SELECT entry, value, seed FROM pid").fetchall())
            pid_pending = [it for it in pid_mine if it not in pid_done]
            bar = tqdm(pid_pending, desc=f"audit PID [{rank}]", disable=not progress or not state.is_local_main_process)
            for j, value, seed in bar:
                e = spec.pid[j]
                prompt = e.template.format(value=value, concept=e.concept)
                t0 = time.perf_counter()
                r = xp.pid(prompt, value, e.concept, seed=seed, num_samples=e.num_samples,
                           num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height,
                           width=spec.width, progress=False)
                _write(con, "INSERT OR IGNORE INTO pid VALUES (?,?,?,?,?,?,?,?,?,?)",
                       [(j, value, seed, e.concept, e.attribute, prompt, json.dumps(r.scalars), r.unet_evals, rank,
                         time.perf_counter() - t0)])
    finally:
        con.close()
    seconds = time.perf_counter() - t_start
    state.wait_for_everyone()  # every process has written its rows
    con = connect(out / "audit.db")
    try:
        n_rows = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    finally:
        con.close()
    if state.is_main_process and progress:
        print(f"audit {spec.name}: {done_now} images now on process {rank} in {seconds:.1f} s; "
              f"{n_rows}/{len(spec.items())} in {out / 'audit.db'}", file=sys.stderr)
    return {"images": len(spec.items()), "rows": n_rows, "done_now": done_now, "seconds": seconds,
            "process": rank, "processes": world}
