"""Audit reports: ``report.json`` (every metric), ``report.csv`` (one row per prompt x attribute x value)
and a self-contained ``report.html`` (bar charts with Wilson intervals, image grids per prompt and
attribute value, PID panels; images embedded as base64 PNGs)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from .metrics import summarize
from .runner import load_pid_rows, load_rows, read_spec

CSV_COLUMNS = ("prompt", "attribute", "value", "count", "n", "share", "ci_low", "ci_high", "target")


def _png(fig_or_image) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        import matplotlib.pyplot as plt

        fig_or_image.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig_or_image)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def share_chart(summary: dict, attribute: str):
    """Grouped bar chart: share of every value per prompt, Wilson 95% error bars, target as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    prompts = list(summary["prompts"])
    first = summary["prompts"][prompts[0]]["attributes"][attribute]
    values = list(first["shares"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(values) * max(1, len(prompts)) / 2), 3.2))
    width = 0.8 / len(prompts)
    x = np.arange(len(values))
    for i, p in enumerate(prompts):
        d = summary["prompts"][p]["attributes"][attribute]
        s = np.array([d["shares"][v] for v in values])
        err = np.array([[s[j] - d["ci_low"][v], d["ci_high"][v] - s[j]] for j, v in enumerate(values)]).T
        ax.bar(x + (i - (len(prompts) - 1) / 2) * width, s, width, yerr=err, capsize=2, label=f"{p} (n={d['n']})")
    t = [first["target"][v] for v in values]
    ax.scatter(x, t, marker="_", s=400, color="black", zorder=5, label="target")
    ax.set_xticks(x, values)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of {attribute}")
    ax.legend(fontsize=7, ncol=2)
    return fig


def pid_chart(summary: dict):
    """Mean redundancy R(value, concept) per configured pair, in nats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["pid"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows)), 3))
    ax.bar(range(len(rows)), [r["R"] for r in rows])
    ax.set_xticks(range(len(rows)), [f"{r['value']}|{r['concept']}" for r in rows], rotation=45, ha="right")
    ax.set_ylabel("redundancy R (nats)")
    return fig


def image_grid(out: Path, rows: list[dict], attribute: str, values: list[str], per_value: int = 8,
               thumb: int = 64) -> Image.Image:
    """One line per value: up to ``per_value`` images judged that value (labelled on the left)."""
    label_w = 80
    grid = Image.new("RGB", (label_w + per_value * (thumb + 2), len(values) * (thumb + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, v in enumerate(values):
        y = i * (thumb + 2)
        draw.text((4, y + thumb // 2 - 6), v, fill="black")
        for j, r in enumerate([r for r in rows if r["labels"].get(attribute) == v][:per_value]):
            with Image.open(out / r["path"]) as im:
                grid.paste(im.convert("RGB").resize((thumb, thumb)), (label_w + j * (thumb + 2), y))
    return grid


def write_csv(summary: dict, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for p, d in summary["prompts"].items():
            for a, s in d["attributes"].items():
                for v in s["shares"]:
                    w.writerow([p, a, v, s["counts"][v], s["n"], s["shares"][v], s["ci_low"][v], s["ci_high"][v],
                                s["target"][v]])


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else html.escape(str(x)))


def write_report(out: str | Path, grids: bool = True) -> dict:
    """Write report.json, report.csv and report.html into the audit folder ``out``; returns the summary."""
    out = Path(out)
    spec = read_spec(out)
    rows = load_rows(out)
    summary = summarize(spec, rows, load_pid_rows(out))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    write_csv(summary, out / "report.csv")

    h = [f"<html><head><meta charset='utf-8'><title>Audit {html.escape(spec.name)}</title>",
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>",
         f"<h1>Audit: {html.escape(spec.name)}</h1>",
         f"<p>judge: {spec.judge}; images: {summary['images']} / {summary['expected_images']}"
         f"{'' if summary['complete'] else ' (INCOMPLETE: rerun audit run to finish)'}</p>"]
    h.append("<h2>Per prompt</h2><table><tr><th>prompt</th><th>n</th><th>H_J</th><th>M_G</th>")
    for a in spec.attributes:
        h.append(f"<th>TV {a}</th><th>chi2 p {a}</th><th>B_D {a}</th>")
    h.append("</tr>")
    for p, d in summary["prompts"].items():
        h.append(f"<tr><td>{html.escape(p)}</td><td>{d['n']}</td><td>{_fmt(d['hallucination'])}</td>"
                 f"<td>{_fmt(d['miss_rate'])}</td>")
        for a in spec.attributes:
            s = d["attributes"][a]
            h.append(f"<td>{_fmt(s['tv'])}</td><td>{_fmt(s['p_value'])}</td><td>{_fmt(s['distribution_bias'])}</td>")
        h.append("</tr>")
    h.append("</table>")
    h.append("<h2>Attributes</h2><table><tr><th>attribute</th><th>prompts</th><th>UCE Delta</th><th>mean TV</th></tr>")
    for a, d in summary["attributes"].items():
        h.append(f"<tr><td>{a}</td><td>{d['prompts']}</td><td>{_fmt(d['uce_delta'])}</td><td>{_fmt(d['mean_tv'])}</td></tr>")
    h.append("</table>")
    if rows:
        for a in spec.attributes:
            h.append(f"<h3>{html.escape(a)}: shares with Wilson 95% intervals (continuity-corrected)</h3>"
                     f"<img src='{_png(share_chart(summary, a))}'>")
    if summary["counterfactuals"]:
        h.append("<h2>Counterfactual pairs (CAS)</h2><table><tr><th>a</th><th>b</th><th>attribute</th><th>CAS</th></tr>")
        for c in summary["counterfactuals"]:
            h.append(f"<tr><td>{html.escape(c['a'])}</td><td>{html.escape(c['b'])}</td><td>{c['attribute']}</td>"
                     f"<td>{_fmt(c['cas'])}</td></tr>")
        h.append("</table>")
    if summary["pid"]:
        h.append("<h2>PID redundancy of (attribute value, concept)</h2>")
        h.append(f"<img src='{_png(pid_chart(summary))}'>")
        h.append("<table><tr><th>prompt</th><th>seeds</th><th>R</th><th>U1</th><th>U2</th><th>S</th></tr>")
        for r in summary["pid"]:
            h.append(f"<tr><td>{html.escape(r['prompt'])}</td><td>{r['seeds']}</td>" +
                     "".join(f"<td>{_fmt(r[k])}</td>" for k in ("R", "U1", "U2", "S")) + "</tr>")
        h.append("</table>")
    if grids and rows:
        h.append("<h2>Images per prompt and judged value</h2>")
        for p in spec.prompts:
            prs = [r for r in rows if r["prompt"] == p]
            for a, s in spec.attributes.items():
                h.append(f"<h4>{html.escape(p)} / {html.escape(a)}</h4>"
                         f"<img src='{_png(image_grid(out, prs, a, s.values))}'>")
    h.append("</body></html>")
    (out / "report.html").write_text("\n".join(h))
    return summary
