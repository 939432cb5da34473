"""``diffusion-xai classify`` and ``diffusion-xai classify-dataset``: zero-shot classification from the shell.

    diffusion-xai classify IMAGE --classes red,green,blue --template "a {} circle"
    diffusion-xai classify IMAGE --classes @prompts.txt            # one prompt per line
    diffusion-xai classify-dataset DIR_OR_CSV [--classes ...] --out results/
    accelerate launch --multi_gpu --num_processes 2 -m diffusion_xai.classify_cli classify-dataset DIR ...
    torchrun --nproc_per_node 2 -m diffusion_xai.classify_cli classify-dataset DIR ...

(On a machine without GPUs the processes of either launcher use gloo on the CPU. ``accelerate launch
--cpu`` alone starts ONE process unless it runs under MPI.)

A dataset is a folder with one sub-folder of images per class label, or a CSV file with the columns
``image`` and ``label`` (image paths relative to the CSV file). ``classify-dataset`` shards the images
across the processes of ``accelerate launch`` (accelerate's ``PartialState.split_between_processes``),
gathers the per-image results on the main process and writes ``summary.json`` (accuracy, confusion
matrix, UNet evaluations, seconds) and ``per_image.json``. The noise depends only on the seed, so the
answer does not depend on the number of processes.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_classes(arg: str) -> list[str]:
    """``a,b,c`` (comma-separated labels) or ``@file`` (one class or prompt per line, blank lines skipped)."""
    if arg.startswith("@"):
        path = Path(arg[1:])
        if not path.exists():
            raise FileNotFoundError(f"class file {path} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in arg.split(",") if c.strip()]


def parse_stages(arg: str | None) -> list[tuple[int, int]] | None:
    """``"50:5,500:1"`` -> [(50, 5), (500, 1)]."""
    if not arg:
        return None
    try:
        return [(int(a), int(b)) for a, b in (s.split(":") for s in arg.split(","))]
    except ValueError:
        raise ValueError(f"--stages must look like '50:5,500:1' (timesteps:keep,...), got {arg!r}") from None


def load_image(path: str | Path):
    """A file as a PIL RGB image (other modes are converted: files often carry alpha or a palette)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    with Image.open(path) as im:
        return im.convert("RGB")


def load_dataset(spec: str | Path) -> list[tuple[str, str]]:
    """(image path, label) pairs of a class-folder directory or an ``image,label`` CSV, in a fixed order."""
    spec = Path(spec)
    if spec.is_dir():
        items = [(str(p), d.name) for d in sorted(spec.iterdir()) if d.is_dir()
                 for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise ValueError(f"{spec} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
        return items
    if spec.suffix.lower() == ".csv" and spec.exists():
        with spec.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"image", "label"} <= set(rows[0]):
            raise ValueError(f"{spec} must be a CSV with the columns 'image' and 'label'")
        return [(str((spec.parent / r["image"]).resolve()), r["label"]) for r in rows]
    raise FileNotFoundError(f"{spec} is neither a folder of class folders nor an existing .csv file")


def _classify_kwargs(a) -> dict:
    return dict(template=a.template, schedule=a.schedule, loss=a.loss, seed=a.seed, trials=a.trials,
                stages=parse_stages(a.stages), max_timesteps=a.max_timesteps, temperature=a.temperature,
                confidence=a.confidence)


def _load_model(a, device=None):
    from .cli import load_model

    xp = load_model(a.model, device or a.device)
    if a.batch_size:
        xp.batch_size = a.batch_size
    return xp


def cmd_classify(a) -> int:
    classes = parse_classes(a.classes)
    image = load_image(a.image)
    xp = _load_model(a)
    res = xp_classify(xp, image, classes, progress=True, **_classify_kwargs(a))
    out = {"image": str(a.image), "model": a.model, **res.to_dict()}
    out.update(out.pop("images")[0])
    text = json.dumps(out, indent=2)
    if a.out:
        path = Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    print(text)
    return 0


def xp_classify(xp, images, classes, **kwargs):
    from .classifier import classify

    return classify(xp, images, classes, **kwargs)


def classify_dataset(xp, items: list[tuple[str, str]], classes: list[str], chunk: int = 16, progress: bool = True,
                     **kwargs) -> tuple[dict, list[dict]]:
    """Classify (path, label) items, sharded over accelerate's processes; every process returns the merged
    (summary, per-image rows), ordered like ``items``."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    unknown = sorted({lab for _, lab in items} - set(classes))
    if unknown:
        raise ValueError(f"dataset labels {unknown} are not among the classes {classes}")
    state = PartialState()
    rows: list[dict] = []
    with state.split_between_processes(list(range(len(items)))) as mine:
        bar = tqdm(total=len(mine), desc=f"classify-dataset [{state.process_index}]",
                   disable=not progress or not state.is_local_main_process)
        for s in range(0, len(mine), chunk):
            idx = mine[s:s + chunk]
            res = xp_classify(xp, [load_image(items[i][0]) for i in idx], classes, progress=False, **kwargs)
            for j, i in enumerate(idx):
                d = res.image_dict(j)
                rows.append({"index": i, "image": items[i][0], "label": items[i][1],
                             "correct": d["prediction"] == items[i][1], **d})
            bar.update(len(idx))
        bar.close()
    if state.num_processes > 1:
        rows = gather_object(rows)
    rows = sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])
    K = len(classes)
    confusion = [[0] * K for _ in range(K)]
    for r in rows:
        confusion[classes.index(r["label"])][r["prediction_index"]] += 1
    n = len(rows)
    summary = {"images": n, "classes": classes, "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
               "confusion": confusion, "confusion_axes": "rows: true label, columns: prediction",
               "unet_evals_per_image": sum(r["unet_evals"] for r in rows) / max(n, 1),
               "seconds_per_image": sum(r["seconds"] for r in rows) / max(n, 1),
               "processes": state.num_processes, **{k: v for k, v in kwargs.items() if k != "noise"}}
    return summary, rows


def cmd_classify_dataset(a) -> int:
    import torch
    from accelerate import PartialState

    items = load_dataset(a.dataset)
    classes = parse_classes(a.classes) if a.classes else sorted({lab for _, lab in items})
    # without a GPU (or with --device cpu) the processes talk over gloo
    state = PartialState(cpu=a.device == "cpu" or not torch.cuda.is_available())
    xp = _load_model(a, device=a.device or (None if state.device.type == "cpu" else str(state.device)))
    summary, rows = classify_dataset(xp, items, classes, chunk=a.chunk, **_classify_kwargs(a))
    if state.is_main_process:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        summary["model"] = a.model
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "per_image.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps({k: summary[k] for k in ("images", "accuracy", "confusion", "unet_evals_per_image",
                                                  "seconds_per_image", "processes")}, indent=2))
        print(f"wrote {out / 'summary.json'} and {out / 'per_image.json'}", file=sys.stderr)
    state.wait_for_everyone()
    return 0


def _options(sp) -> None:
    from .classifier import LOSSES, SCHEDULES

    sp.add_argument("--template", default=None, help="prompt template with {} for the class, e.g. 'a photo of a {}'")
    sp.add_argument("--schedule", choices=SCHEDULES, default="fast")
    sp.add_argument("--loss", choices=LOSSES, default="l2")
    sp.add_argument("--trials", type=int, default=1, help="noises per timestep")
    sp.add_argument("--stages", default=None, help="reference stages 'timesteps:keep,...', e.g. '50:5,500:1'")
    sp.add_argument("--max-timesteps", type=int, default=None, help="fast: most timesteps per image")
    sp.add_argument("--confidence", type=float, default=0.99, help="fast: elimination confidence")
    sp.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: stored calibration)")
    sp.add_argument("--batch-size", type=int, default=None, help="UNet rows per call (default: the model's)")
    sp.add_argument("--model", default="shapesworld",
                    help="'shapesworld' (embedded, default), 'tiny-random', or a diffusers folder / hub id")
    sp.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    sp.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    """Add ``classify`` and ``classify-dataset`` to the ``diffusion-xai`` sub-command parser."""
    c = subparsers.add_parser("classify", help="zero-shot classification of an image (Diffusion Classifier)")
    c.add_argument("image")
    c.add_argument("--classes", required=True, help="comma-separated classes, or @file with one per line")
    c.add_argument("--out", default=None, help="also write the JSON to this file")
    _options(c)
    c.set_defaults(func=cmd_classify)

    d = subparsers.add_parser("classify-dataset", help="accuracy and confusion matrix on a labelled image set "
                                                       "(shards across processes under `accelerate launch`)")
    d.add_argument("dataset", help="folder of class folders, or a CSV with columns image,label")
    d.add_argument("--classes", default=None, help="candidate classes (default: the dataset's labels, sorted)")
    d.add_argument("--out", default="out/classify", help="output folder")
    d.add_argument("--chunk", type=int, default=16, help="images per classify call")
    _options(d)
    d.set_defaults(func=cmd_classify_dataset)


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m diffusion_xai.classify_cli``), e.g. for ``accelerate launch -m``."""
    from .cli import standalone_main

    return standalone_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
