"""DiffusionPID on ShapesWorld: localisation, segmentation, synonym and bias redundancy, speed.

    python benchmarks/pid.py [--model PATH] [--images 60] [--samples 100] [--source generated|rendered] [--quick]

- Localisation (two-object prompts "a {c1} {s1} and a {c2} {s2}", >= --images images whose two objects
  the oracle confirms): conditional PID of a colour pair (c1, c2) on even images and a shape pair
  (s1, s2) on odd ones. For each word, the share of its positive uniqueness map U and of its CMI map
  I that falls inside its object's mask (mask pooled to latent resolution; target >= 0.7), next to
  the share a uniform map would get (the mask's area) and the share a map shaped like the pooled mask
  itself would get (what a perfect latent-resolution map reaches: objects cover cells only in part).
- Segmentation: mIoU of the min-max-normalised, thresholded CMI map (upsampled to 64x64) against the
  object mask, side by side with the DAAM heatmap mIoU of the same words on the same images
  (``xp.heatmaps``); at DAAM's tau = 0.4 and at the best tau of a sweep (as the reference numbers).
- Synonyms: unconditional PID of (word, synonym) vs (word, another value of the same attribute) on
  single-object images; ordering accuracy = share of images where the synonym pair's redundancy is
  higher.
- Biases: conditional PID of (value, shape) for each injected colour/size-shape association (e.g.
  "a red circle") vs the same value with the unbiased control shape ("a red cross"), same seeds:
  redundancy R and normalised redundancy R / min(I1, I2); win rate of the biased pair.
- Speed: UNet evaluations and seconds per PID map, throughput against one plain batched
  ``predict_noise`` call over the same number of rows (target >= 0.9x).

``--bands`` runs only a diagnostic of the localisation (written to pid_bands.json): the same share
inside the mask, for the full integral and for narrow logSNR bands (each band's PID integrates
``loc +/- 3 * 0.05``), with the reference string removal and with embedding-level removal, so one
can see whether any noise level or removal mode holds a more local map than the full integral.

``--source rendered`` analyses ShapesWorld's own rendered scenes (exact ground-truth masks, no
generation; no heatmap column) instead of generated images. Writes benchmarks/results/pid.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import table, write_json  # noqa: E402

from diffusion_xai import XAIPipeline  # noqa: E402
from diffusion_xai.heatmaps import normalize  # noqa: E402
from diffusion_xai.information import pid  # noqa: E402
from diffusion_xai.shapesworld import (  # noqa: E402
    BIASES,
    COLORS,
    CONTROL_SHAPE,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MODEL_DIR,
    SHAPES,
    judge,
    load_shapesworld_pipeline,
)
from diffusion_xai.shapesworld.scene import IMAGE_SIZE, LAYOUTS, SIZES, SYNONYMS, build_scene  # noqa: E402

THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]
DAAM_TAU = 0.4


# ------------------------------------------------------------------------------------------ helpers
def pooled_mask(mask: np.ndarray, f: int) -> torch.Tensor:
    """Share of every latent pixel covered by a (H, W) bool mask: (H/f, W/f) float64."""
    m = torch.from_numpy(mask.astype(np.float64))[None, None]
    return F.avg_pool2d(m, f)[0, 0]


def share_inside(m: torch.Tensor, frac: torch.Tensor) -> float:
    """Share of the positive part of a latent map inside a pooled mask (nan for an all-zero map)."""
    pos = m.clamp_min(0)
    total = pos.sum().item()
    return (pos * frac).sum().item() / total if total > 0 else math.nan


def word_shares(res, j: int, mask: np.ndarray, f: int) -> dict[str, float]:
    """Shares of word j's (0 or 1) U and CMI maps of a PIDResult inside its object's (H, W) mask."""
    frac = pooled_mask(mask, f)
    return {"share_U": share_inside(res.map(f"U{j + 1}"), frac),
            "share_CMI": share_inside(res.map(f"I{j + 1}"), frac)}


def iou(pred: np.ndarray, mask: np.ndarray) -> float:
    union = (pred | mask).sum()
    return float((pred & mask).sum() / union) if union else 0.0


def ious_over_thresholds(m: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """IoU of (normalised map >= tau) vs mask for every tau in THRESHOLDS; m at image resolution."""
    n = normalize(m.float()).numpy()
    return np.array([iou(n >= t, mask) for t in THRESHOLDS])


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0]


def mean(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


def load(model: str | None, device: str | None) -> XAIPipeline:
    pipe = load_shapesworld_pipeline(Path(model) if model else MODEL_DIR)
    if device:
        pipe = pipe.to(device)
    return XAIPipeline(pipe, batch_size=64, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)


def find_object(objs, color: str, shape: str):
    hits = [o for o in objs if o.color == color and o.shape == shape]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------------------------ localisation
def two_object_items(xp, n: int, source: str, rng, max_tries: int):
    """Yield (prompt, image, [mask1, mask2], colours, shapes, seed, heatmap result or None)."""
    found = tries = 0
    while found < n and tries < max_tries:
        seed = 5000 + tries
        tries += 1
        c1, c2 = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
        s1, s2 = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
        prompt = f"a {c1} {s1} and a {c2} {s2}"
        if source == "rendered":
            layout = LAYOUTS[2][int(rng.integers(len(LAYOUTS[2])))]
            sizes = [str(rng.choice(SIZES)) for _ in range(2)]
            scene = build_scene([(s1, c1, sizes[0], layout[0], True, False), (s2, c2, sizes[1], layout[1], True, False)],
                                mention_position=False, rng=np.random.default_rng(seed))
            assert scene.caption == prompt, (scene.caption, prompt)
            from PIL import Image

            image, masks, hm = Image.fromarray(scene.image), [o.mask for o in scene.objects], None
        else:
            hm = xp.heatmaps(prompt, seed=seed, height=IMAGE_SIZE, width=IMAGE_SIZE, progress=False,
                             words=[c1, s1, c2, s2])
            image = hm.images[0]
            objs = judge(image)
            o1, o2 = find_object(objs, c1, s1), find_object(objs, c2, s2)
            if o1 is None or o2 is None:
                continue
            masks = [o1.mask, o2.mask]
        found += 1
        yield prompt, image, masks, (c1, c2), (s1, s2), seed, hm
    print(f"  localisation: {found} usable images of {tries} tried", flush=True)


def localisation(xp, n: int, samples: int, source: str) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    f = xp.vae_scale_factor
    per_word = []
    seconds = []
    for k, (prompt, image, masks, cols, shps, seed, hm) in enumerate(
            two_object_items(xp, n, source, rng, max_tries=4 * n)):
        words = cols if k % 2 == 0 else shps
        res = pid(xp, image, words[0], words[1], prompt=prompt, num_samples=samples, seed=seed, progress=False)
        seconds.append(res.seconds)
        for j, (w, mask) in enumerate(zip(words, masks)):
            frac = pooled_mask(mask, f)
            row = {"prompt": prompt, "word": w, "kind": "colour" if k % 2 == 0 else "shape",
                   **word_shares(res, j, mask, f), "mask_area": float(mask.mean()),
                   "mask_shaped_share": share_inside(frac, frac),
                   "iou_CMI": ious_over_thresholds(upsample(res.map(f"I{j + 1}"), mask.shape), mask)}
            if hm is not None:
                row["iou_DAAM"] = ious_over_thresholds(upsample(hm.word_map(w), mask.shape), mask)
            per_word.append(row)
        print(f"  [{k + 1}/{n}] {prompt!r} pair {words}: R={res.R:.3g} U1={res.U1:.3g} U2={res.U2:.3g} "
              f"S={res.S:.3g} ({res.seconds:.2f} s)", flush=True)
    rows = []
    for kind in ("colour", "shape", "all"):
        sel = [r for r in per_word if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        row = {"words": kind, "n": len(sel), "share_U": mean(r["share_U"] for r in sel),
               "share_CMI": mean(r["share_CMI"] for r in sel), "uniform_share": mean(r["mask_area"] for r in sel),
               "mask_shaped_share": mean(r["mask_shaped_share"] for r in sel)}
        cmi = np.mean([r["iou_CMI"] for r in sel], 0)
        row.update(mIoU_CMI_tau04=float(cmi[THRESHOLDS.index(DAAM_TAU)]), mIoU_CMI_best=float(cmi.max()),
                   tau_CMI=THRESHOLDS[int(cmi.argmax())])
        if "iou_DAAM" in sel[0]:
            daam = np.mean([r["iou_DAAM"] for r in sel], 0)
            row.update(mIoU_DAAM_tau04=float(daam[THRESHOLDS.index(DAAM_TAU)]), mIoU_DAAM_best=float(daam.max()),
                       tau_DAAM=THRESHOLDS[int(daam.argmax())])
        rows.append(row)
    detail = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in per_word]
    return rows, {"per_word": detail, "seconds_per_pid": mean(seconds), "thresholds": THRESHOLDS}


# ------------------------------------------------------------------------------------------ bands
BAND_CENTRES = (-4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
BAND_SCALE = 0.05


def bands(xp, n: int, samples: int, source: str, removals=("string", "embedding")) -> tuple[list[dict], list[dict]]:
    """Localisation shares per logSNR band and removal mode, on the localisation benchmark's first n images."""
    items = list(two_object_items(xp, n, source, np.random.default_rng(0), max_tries=4 * n))
    f = xp.vae_scale_factor
    settings = [("full", None)] + [(f"{c:+g}", c) for c in BAND_CENTRES]
    rows, detail = [], []
    for removal in removals:
        for label, centre in settings:
            kw = {} if centre is None else {"loc": centre, "scale": BAND_SCALE}
            per_word = []
            for k, (prompt, image, masks, cols, shps, seed, _) in enumerate(items):
                words = cols if k % 2 == 0 else shps
                res = pid(xp, image, words[0], words[1], prompt=prompt, num_samples=samples, seed=seed,
                          removal=removal, progress=False, **kw)
                width = 2 * res.scale * res.clip  # logSNR range the estimate integrates over
                for j, (w, mask) in enumerate(zip(words, masks)):
                    per_word.append({"kind": "colour" if k % 2 == 0 else "shape", "word": w, "prompt": prompt,
                                     **word_shares(res, j, mask, f),
                                     "cmi_per_logsnr": float(res.map(f"I{j + 1}").sum()) / width})
            for kind in ("colour", "shape"):
                sel = [r for r in per_word if r["kind"] == kind]
                row = {"removal": removal, "logsnr": label if centre is None else f"{centre - 3 * BAND_SCALE:+.2f}.."
                       f"{centre + 3 * BAND_SCALE:+.2f}", "words": kind, "n": len(sel),
                       "share_U": mean(r["share_U"] for r in sel), "share_CMI": mean(r["share_CMI"] for r in sel),
                       "cmi_per_logsnr": mean(r["cmi_per_logsnr"] for r in sel)}
                rows.append(row)
                print(f"  {removal} {row['logsnr']} {kind}: share_U {row['share_U']:.3f} share_CMI "
                      f"{row['share_CMI']:.3f}", flush=True)
            detail.append({"removal": removal, "setting": label, "per_word": per_word})
    return rows, detail


# ------------------------------------------------------------------------------------------ synonyms
def single_image(xp, prompt: str, seed: int, source: str, spec: tuple):
    if source == "rendered":
        from PIL import Image

        shape, color, size, m_color, m_size = spec
        scene = build_scene([(shape, color, size, "center", m_color, m_size)], mention_position=False,
                            rng=np.random.default_rng(seed))
        return Image.fromarray(scene.image)
    return xp.generate(prompt, seed=seed, height=IMAGE_SIZE, width=IMAGE_SIZE, progress=False).images[0]


def synonyms(xp, n: int, samples: int, source: str) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(1)
    groups = [(canon, syns[0]) for canon, syns in SYNONYMS.items()]
    detail = []
    for k in range(n):
        canon, syn = groups[k % len(groups)]
        color = "purple" if canon == "purple" else str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES)) if canon not in SHAPES else canon
        size = canon if canon in SIZES else str(rng.choice(SIZES))
        if canon in SIZES:
            prompt, spec = f"a {size} {color} {shape}", (shape, color, size, True, True)
        else:
            prompt, spec = f"a {color} {shape}", (shape, color, size, True, False)
        attr = "shape" if canon in SHAPES else "size" if canon in SIZES else "color"
        others = [v for v in {"shape": SHAPES, "size": SIZES, "color": tuple(COLORS)}[attr] if v != canon]
        other = str(rng.choice(others))
        seed = 7000 + k
        image = single_image(xp, prompt, seed, source, spec)
        r_syn = pid(xp, image, canon, syn, conditional=False, num_samples=samples, seed=seed, progress=False)
        r_oth = pid(xp, image, canon, other, conditional=False, num_samples=samples, seed=seed, progress=False)
        detail.append({"prompt": prompt, "word": canon, "synonym": syn, "other": other,
                       "R_synonym": r_syn.R, "R_other": r_oth.R,
                       "Rnorm_synonym": r_syn.R / max(min(r_syn.I1, r_syn.I2), 1e-12),
                       "Rnorm_other": r_oth.R / max(min(r_oth.I1, r_oth.I2), 1e-12)})
        print(f"  [{k + 1}/{n}] {prompt!r}: R({canon},{syn})={r_syn.R:.3g}  R({canon},{other})={r_oth.R:.3g}",
              flush=True)
    rows = []
    for g in [c for c, _ in groups] + ["all"]:
        sel = [d for d in detail if g == "all" or d["word"] == g]
        if sel:
            rows.append({"word": g, "n": len(sel), "R_synonym": mean(d["R_synonym"] for d in sel),
                         "R_other": mean(d["R_other"] for d in sel),
                         "ordering_acc": mean(float(d["R_synonym"] > d["R_other"]) for d in sel),
                         "ordering_acc_norm": mean(float(d["Rnorm_synonym"] > d["Rnorm_other"]) for d in sel)})
    return rows, detail


# ------------------------------------------------------------------------------------------ biases
def biases(xp, n: int, samples: int, source: str) -> tuple[list[dict], list[dict]]:
    rows, detail = [], []
    for (shape, attr), dist in BIASES.items():
        value = max(dist, key=dist.get)
        res = {}
        for s in (shape, CONTROL_SHAPE):
            res[s] = []
            for k in range(n):
                seed = 9000 + k
                if attr == "color":
                    prompt, spec = f"a {value} {s}", (s, value, "large", True, False)
                else:
                    prompt, spec = f"a {value} {s}", (s, "red", value, False, True)
                image = single_image(xp, prompt, seed, source, spec)
                r = pid(xp, image, value, s, prompt=prompt, num_samples=samples, seed=seed, progress=False)
                res[s].append((r.R, r.R / max(min(r.I1, r.I2), 1e-12)))
                detail.append({"prompt": prompt, "pair": [value, s], "biased": s == shape, **r.scalars})
        b, c = np.array(res[shape]), np.array(res[CONTROL_SHAPE])
        rows.append({"biased_pair": f"{value}+{shape}", "control_pair": f"{value}+{CONTROL_SHAPE}", "n": n,
                     "R_biased": float(b[:, 0].mean()), "R_control": float(c[:, 0].mean()),
                     "Rnorm_biased": float(b[:, 1].mean()), "Rnorm_control": float(c[:, 1].mean()),
                     "win_rate_R": float((b[:, 0] > c[:, 0]).mean()),
                     "win_rate_Rnorm": float((b[:, 1] > c[:, 1]).mean())})
        print(f"  {rows[-1]}", flush=True)
    return rows, detail


# ------------------------------------------------------------------------------------------ speed
def speed(xp, samples: int, reps: int) -> dict:
    prompt = "a red circle and a blue square"
    image = xp.generate(prompt, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE, progress=False).images[0]
    latent = xp.encode_image(image)
    rows = 4 * samples
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(rows, *latent.shape[1:], generator=g).to(xp.device)
    t = torch.randint(0, xp.num_train_timesteps, (rows,), generator=g)
    emb = xp.encode_prompt(prompt)

    def sync():
        if xp.device.type == "cuda":
            torch.cuda.synchronize(xp.device)

    def plain():
        xp.predict_noise(x, t, emb)
        sync()

    plain_times, pid_times = [], []
    evals = 0
    for r in range(1 + reps):  # interleaved, the first round is a warm-up
        t1 = time.perf_counter()
        plain()
        t_plain = time.perf_counter() - t1
        e0 = xp.unet_evals
        res = pid(xp, image, "red", "circle", prompt=prompt, num_samples=samples, progress=False)
        evals = xp.unet_evals - e0
        if r:
            plain_times.append(t_plain)
            pid_times.append(res.seconds)  # the analysis alone (no image encoding, no plotting)
    t_pid, t_plain = float(np.median(pid_times)), float(np.median(plain_times))
    return {"num_samples": samples, "unet_evals_per_pid": evals, "seconds_per_pid": t_pid,
            "seconds_plain_same_rows": t_plain, "throughput_vs_plain": t_plain / t_pid,
            "rows_per_second_pid": rows / t_pid, "batch_size": xp.batch_size, "device": str(xp.device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="ShapesWorld pipeline folder (default: the embedded model)")
    p.add_argument("--device", default=None)
    p.add_argument("--images", type=int, default=60, help="usable two-object images for localisation")
    p.add_argument("--synonym-images", type=int, default=48)
    p.add_argument("--bias-images", type=int, default=20, help="images per biased / control pair")
    p.add_argument("--samples", type=int, default=100, help="(logSNR, noise) samples per PID")
    p.add_argument("--source", choices=("generated", "rendered"), default="generated")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument("--name", default=None, help="name of the JSON written (default pid, or pid_bands)")
    p.add_argument("--bands", action="store_true",
                   help="only the localisation diagnostic per logSNR band and removal mode (--images images)")
    a = p.parse_args()
    if a.quick:
        a.images, a.synonym_images, a.bias_images, a.samples = 2, 2, 1, 8
    a.name = a.name or ("pid_bands" if a.bands else "pid")
    torch.manual_seed(0)
    xp = load(a.model, a.device)
    t0 = time.perf_counter()
    if a.bands:
        rows, detail = bands(xp, a.images, a.samples, a.source)
        print(table(rows, f"Localisation share inside the object mask per logSNR band and removal mode "
                          f"({a.source} images, N={a.samples} per estimate; target share >= 0.7)"))
        print("\nwrote", write_json(a.name, {"args": vars(a), "bands": rows, "detail": detail,
                                             "total_seconds": time.perf_counter() - t0}))
        return
    print("speed ...", flush=True)
    sp = speed(xp, a.samples, reps=2 if a.quick else 5)
    print(table([sp], "Speed: one conditional PID (4N UNet evals) vs a plain batched predict_noise of 4N rows"))
    print("\nlocalisation ...", flush=True)
    loc_rows, loc_detail = localisation(xp, a.images, a.samples, a.source)
    if loc_rows:
        print(table(loc_rows, f"Localisation in the object mask (target share >= 0.7) and segmentation mIoU "
                              f"({a.source} images, N={a.samples})"))
    print("\nsynonyms ...", flush=True)
    syn_rows, syn_detail = synonyms(xp, a.synonym_images, a.samples, a.source)
    print(table(syn_rows, "Redundancy: synonym pair vs another value of the same attribute (unconditional PID)"))
    print("\nbiases ...", flush=True)
    bias_rows, bias_detail = biases(xp, a.bias_images, a.samples, a.source)
    print(table(bias_rows, "Redundancy of injected-bias pairs vs the control shape (conditional PID)"))
    payload = {"args": vars(a), "speed": sp, "localisation": loc_rows, "synonyms": syn_rows, "biases": bias_rows,
               "detail": {"localisation": loc_detail, "synonyms": syn_detail, "biases": bias_detail},
               "total_seconds": time.perf_counter() - t0}
    print("\nwrote", write_json(a.name, payload))


if __name__ == "__main__":
    main()
