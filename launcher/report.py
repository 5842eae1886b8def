"""`python -m launcher report RUN_DIR [RUN_DIR ...] [--out=FILE]`: one self-contained HTML page.

Built only from each run directory's own files (metrics.jsonl, config.json, confusion.json,
summary.json), so it works for offline runs and needs no server: plots are matplotlib PNGs
embedded as data URIs, the page has no scripts and loads nothing from the network. It shows
training and validation loss, validation accuracy, the LR of every parameter group, throughput,
each run's latest confusion matrix, a summary per run, and the config fields that differ.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field

from launcher.config import ConfigError


@dataclass
class Run:
    name: str
    path: str
    config: dict
    metrics: list[dict]
    summary: dict = field(default_factory=dict)
    confusion: dict | None = None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(m["step"], m[key]) for m in self.metrics if key in m]
        return [s for s, _ in points], [v for _, v in points]

    def keys(self, prefix: str) -> list[str]:
        return sorted({k for m in self.metrics for k in m if k.startswith(prefix)})


def load_run(path: str) -> Run:
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise ConfigError(f"{path} is not a run directory (no metrics.jsonl); pass a run's output_dir")

    def read(name: str, default):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return default
        with open(file) as f:
            return json.load(f)

    with open(metrics_path) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return Run(name=os.path.basename(os.path.normpath(path)), path=path, config=read("config.json", {}),
               metrics=metrics, summary=read("summary.json", {}), confusion=read("confusion.json", None))


def config_differences(runs: list[Run]) -> list[tuple[str, list]]:
    """(field, value per run) for every config field whose values are not all equal."""
    fields = sorted({k for run in runs for k in run.config})
    rows = []
    for name in fields:
        values = [run.config.get(name, "-") for run in runs]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            rows.append((name, values))
    return rows


def make_report(run_dirs: list[str], out: str = "") -> str:
    """Write the report; returns its path."""
    if not run_dirs:
        raise ConfigError("report needs at least one RUN_DIR: python -m launcher report RUN_DIR [RUN_DIR ...]")
    runs = [load_run(path) for path in run_dirs]
    out = out or (os.path.join(run_dirs[0], "report.html") if len(runs) == 1 else "report.html")
    page = render(runs)
    with open(out, "w") as f:
        f.write(page)
    return out


def render(runs: list[Run]) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    figures = [("Training loss", _curves(runs, ["train/loss"], "cross-entropy loss")),
               ("Validation loss", _curves(runs, ["val/loss"], "cross-entropy loss")),
               ("Validation accuracy", _curves(runs, ["val/top1", "val/top5"], "accuracy (%)", scale=100)),
               ("Learning rate per parameter group", _lr_curves(runs)),
               ("Throughput", _curves(runs, ["train/samples_per_s"], "samples / s (all processes)"))]
    figures += [(f"Confusion matrix: {run.name} (step {run.confusion['step']})", _confusion(run))
                for run in runs if run.confusion and run.confusion.get("matrix")]
    parts = [f"<h1>launcher report: {html.escape(', '.join(run.name for run in runs))}</h1>",
             _summary_table(runs), _config_table(runs)]
    parts += [f'<figure><figcaption>{html.escape(title)}</figcaption>'
              f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}"></figure>'
              for title, png in figures if png]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
             "figure{margin:1.5em 0} figcaption{font-weight:bold;margin-bottom:.4em} img{max-width:100%}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>launcher report</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _curves(runs: list[Run], keys: list[str], ylabel: str, scale: float = 1.0) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.6))
    drawn = 0
    for run in runs:
        for key in keys:
            steps, values = run.series(key)
            if steps:
                axes.plot(steps, [v * scale for v in values], marker="o" if len(steps) < 30 else None,
                          label=f"{run.name}: {key}")
                drawn += 1
    if not drawn:
        plt.close(figure)
        return ""
    axes.set(xlabel="optimizer step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _lr_curves(runs: list[Run]) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.6))
    for run in runs:
        for key in run.keys("lr/"):
            steps, values = run.series(key)
            axes.plot(steps, values, label=f"{run.name}: {key[3:]}")
    if not axes.lines:
        plt.close(figure)
        return ""
    axes.set(xlabel="optimizer step", ylabel="learning rate")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    return _png(figure)


def _confusion(run: Run) -> str:
    return _png(confusion_figure(run.confusion["matrix"], run.confusion.get("classes")))


def confusion_figure(matrix: list[list[int]], names: list[str] | None):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(matrix)
    names = names or [str(i) for i in range(len(matrix))]
    size = min(12, 3 + 0.4 * len(matrix))
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, label="validation samples")
    if len(matrix) <= 30:
        axes.set_xticks(range(len(names)), names, rotation=90)
        axes.set_yticks(range(len(names)), names)
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if count > matrix.max() / 2 else "black")
    axes.set(xlabel="predicted class", ylabel="true class")
    return figure


def _summary_table(runs: list[Run]) -> str:
    rows = ["<tr><th>run</th><th>directory</th><th>steps</th><th>best</th><th>samples seen</th>"
            "<th>time (s)</th><th>unreadable skipped</th></tr>"]
    for run in runs:
        s = run.summary
        best = (f"{s['best/metric']} {s['best/value']:.4g} (step {s['best/step']})" if "best/metric" in s else "-")
        cells = [run.name, run.path, s.get("steps", "-"), best, s.get("samples_seen", "-"),
                 s.get("total_time_s", "-"), s.get("unreadable_skipped", "-")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "<h2>Runs</h2><table>" + "".join(rows) + "</table>"


def _config_table(runs: list[Run]) -> str:
    if len(runs) == 1:
        rows, title = sorted(runs[0].config.items()), "Config"
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in rows)
        return f"<h2>{title}</h2><table>{body}</table>"
    head = "<tr><th>field</th>" + "".join(f"<th>{html.escape(run.name)}</th>" for run in runs) + "</tr>"
    differences = config_differences(runs)
    body = "".join("<tr><td>" + html.escape(name) + "</td>"
                   + "".join(f"<td>{html.escape(json.dumps(v))}</td>" for v in values) + "</tr>"
                   for name, values in differences)
    if not differences:
        body = f'<tr><td colspan="{len(runs) + 1}">the configs are identical</td></tr>'
    return f"<h2>Config differences</h2><table>{head}{body}</table>"
