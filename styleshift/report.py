"""`styleshift report RUN`: one HTML page showing how a run is going, written as RUN/report.html.

The page holds the loss curves, the evaluation curves (`train --eval-every`), the last `styleshift eval`
result (RUN/eval.json), the sample grids over time, the configuration and links to the exported styles.
Curves are embedded (PNG data or inline SVG, see styleshift.plots); sample grids are linked relative to the
run directory, where they live, so refreshing the page at every checkpoint stays cheap; `embed=True` puts
them inside the page too, for a file that can be moved or sent on its own. No torch import: a report of a
run is quick to write from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path

from .fsutil import atomic_write_text
from .plots import Series, chart

REPORT_NAME = "report.html"
MAX_GRIDS = 8  # sample grids shown over time (evenly spread, the first and the latest included)
GENERATOR_TERMS = ("G_", "cycle_", "idt_")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1320px; color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } .meta { color: #666; margin-top: 0; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .chart { border: 1px solid #ddd; max-width: 100%; }
.grids { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { color: #555; font-size: 13px; text-align: center; }
.latest img { max-width: 480px; } .over-time img { width: 150px; }
img.grid { border: 1px solid #ddd; image-rendering: auto; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line being written (cut short) is ignored."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict], key: str, label: str | None = None, dashed: bool = False) -> Series:
    rows = [r for r in records if isinstance(r.get(key), (int, float))]
    return Series(label or key, [r["step"] for r in rows], [r[key] for r in rows], dashed)


def curves(records: list[dict], renderer: str = "auto") -> list[str]:
    """The charts of a run: losses, speed and, when the run evaluates itself, SWD and cycle scores."""
    losses = [r for r in records if "eval_swd" not in r]
    keys = list(dict.fromkeys(k for r in losses for k in r if k not in ("step", "epoch", "lr", "sec_per_step")))
    evals = [r for r in records if "eval_swd" in r]
    charts = [
        ("Generator losses", [_series(losses, k) for k in keys if k.startswith(GENERATOR_TERMS)], "loss"),
        ("Discriminator losses", [_series(losses, k) for k in keys if k.startswith("D_")], "loss"),
        ("Speed", [_series(losses, "sec_per_step", "seconds per step")], "s"),
    ]
    if evals:
        where = "held-aside photos" if evals[-1].get("eval_held_aside") else "photos"
        charts += [
            ("SWD to the style set (lower is closer)",
             [_series(evals, "eval_swd", f"G({where})"), _series(evals, "eval_swd_baseline", where, dashed=True)],
             "SWD x 1e3"),
            ("Cycle reconstruction PSNR", [_series(evals, "eval_cycle_psnr", "F(G(x)) vs x")], "dB"),
            ("Cycle reconstruction SSIM", [_series(evals, "eval_cycle_ssim", "F(G(x)) vs x")], ""),
        ]
    return [chart(title, series, ylabel, renderer) for title, series, ylabel in charts if any(s.x for s in series)]


def sample_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of the sample grids to show: at most MAX_GRIDS, evenly spread, the latest included."""
    grids = sorted((int(p.stem.split("_")[-1]), p) for p in (run_dir / "samples").glob("step_*.png")
                   if p.stem.split("_")[-1].isdigit())
    if len(grids) <= MAX_GRIDS:
        return grids
    return [grids[round(i * (len(grids) - 1) / (MAX_GRIDS - 1))] for i in range(MAX_GRIDS)]


def _image_src(path: Path, run_dir: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html.escape(path.relative_to(run_dir).as_posix())


def _grid_figure(step: int, path: Path, run_dir: Path, embed: bool) -> str:
    img = f'<img class="grid" alt="samples at step {step}" src="{_image_src(path, run_dir, embed)}">'
    link = img if embed else f'<a href="{html.escape(path.relative_to(run_dir).as_posix())}">{img}</a>'
    return f"<figure>{link}<figcaption>step {step}</figcaption></figure>"


def _flatten(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in sorted(config.items()):
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f'<td class="num">{v:.4g}</td>' if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _eval_section(result: dict) -> str:
    parts = [f"<p>{html.escape(str(result.get('photos')))} and {html.escape(str(result.get('paintings')))}, "
             f"{result.get('size')} px centre crops, step {result.get('step')}.</p>"]
    for direction in ("forward", "inverse"):
        r = result.get(direction)
        if not r:
            continue
        header = ["SWD x 1e3", *(f"{s} px" for s in r["swd"]["resolutions"]), "mean"]
        rows = [[label, *(round(v, 1) for v in swd["levels"]), round(swd["mean"], 1)] for label, swd in
                (("untranslated (baseline)", r["swd_baseline"]), ("translated", r["swd"]))]
        parts.append(f"<h3>{direction}: {r['source_images']} images against {r['target_images']}</h3>"
                     + _table(header, rows)
                     + f"<p>cycle PSNR {r['cycle_psnr']:.2f} dB, SSIM {r['cycle_ssim']:.3f}</p>")
    return "\n".join(parts)


def _files_section(run_dir: Path) -> str:
    items = []
    for style in sorted(run_dir.glob("*.safetensors")):
        items.append(f'<li><a href="{html.escape(style.name)}">{html.escape(style.name)}</a> '
                     f"({style.stat().st_size / 1e6:.1f} MB), the exported style: "
                     f"<code>styleshift apply PHOTO --style {html.escape(str(run_dir / style.name))}</code></li>")
    for name in ("config.json", "metrics.jsonl", "eval.json"):
        if (run_dir / name).exists():
            items.append(f'<li><a href="{name}">{name}</a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def render(run_dir: str | os.PathLike, embed: bool = False, renderer: str = "auto") -> str:
    """The report page of `run_dir` as a string."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    records = read_metrics(run_dir / "metrics.jsonl")
    name = config.get("name", run_dir.name)
    last = records[-1] if records else {}
    grids = sample_grids(run_dir)
    eval_path = run_dir / "eval.json"
    sections = [("Curves", '<div class="charts">' + "\n".join(curves(records, renderer)) + "</div>"
                 if records else "<p>No metrics logged yet.</p>")]
    if grids:
        latest = _grid_figure(*grids[-1], run_dir, embed)
        over_time = "\n".join(_grid_figure(step, p, run_dir, embed) for step, p in grids)
        sections.append(("Samples", "<p>Each row: real | translated | reconstructed; photos first, then "
                         f'paintings.</p><div class="grids latest">{latest}</div><h3>Over time</h3>'
                         f'<div class="grids over-time">{over_time}</div>'))
    if eval_path.exists():
        sections.append(("Evaluation (styleshift eval)", _eval_section(json.loads(eval_path.read_text()))))
    sections += [("Files", _files_section(run_dir)),
                 ("Configuration", _table(["setting", "value"], [list(r) for r in _flatten(config)]))]
    meta = (f"step {last.get('step', 0)}, epoch {last.get('epoch', 0)} &middot; {html.escape(str(run_dir))} "
            f"&middot; updated {time.strftime('%Y-%m-%d %H:%M')}")
    body = "\n".join(f"<section><h2>{title}</h2>\n{content}</section>" for title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>styleshift: '
            f"{html.escape(name)}</title><style>{STYLE}</style></head>\n<body><h1>{html.escape(name)}</h1>"
            f'<p class="meta">{meta}</p>\n{body}\n</body></html>\n')


def write_report(run_dir: str | os.PathLike, embed: bool = False, renderer: str = "auto") -> Path:
    """Write RUN/report.html (atomically) and return its path."""
    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, render(run_dir, embed, renderer))
    return path
