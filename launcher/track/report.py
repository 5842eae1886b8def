"""`python -m launcher report RUN_DIR [RUN_DIR ...] [--out=FILE]`: one self-contained HTML page.

Built only from each run directory's own files (metrics.jsonl, config.json, task.json,
confusion.json, summary.json), so it works for offline runs and needs no server: plots are
matplotlib PNGs embedded as data URIs, the page has no scripts and loads nothing from the network.
It shows training and validation loss (labelled with each run's loss, from task.json), one plot per
validation metric the runs logged (accuracies in %, others as they are), the LR of every parameter
group, throughput, each classification run's latest confusion matrix, a summary per run, and the
config fields that differ, with what config.json alone does not say (from environment.json: the
processes, the global batch, the launcher's version and git commit). Curves are drawn against
optimizer steps, samples seen or epochs (`--x=step|samples|epoch`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.config import ConfigError
from launcher.global_batch import GlobalBatch

ACCURACY_ENDINGS = ("top1", "top5", "accuracy", "acc")  # metrics shown as percentages
NOT_PLOTTED = ("loss", "samples", "unreadable")  # val/loss has its own plot; the others are counts
# --x: the curves' x-axis label
X_AXES = {"step": "optimizer step", "samples": "samples seen", "epoch": "epoch"}
METRIC_NAMES = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "token_accuracy": "token accuracy",
    "mse": "mean squared error",
    "mae": "mean absolute error",
    "r2": "R² (coefficient of determination)",
}


@dataclass
class Run:
    name: str
    path: str
    config: dict
    metrics: list[dict]
    summary: dict = field(default_factory=dict)
    confusion: dict | None = None
    # task.json: task, loss, metrics, best_metric, best_mode, steps_per_epoch
    task: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # environment.json: world_size, versions, launcher_commit

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """`key`'s logged values against `x` (X_AXES): optimizer steps, samples seen or epochs."""
        points = [(m["step"], m[key]) for m in self.metrics if _is_number(m.get(key))]
        position = self.x_axis(x) if points else None
        return [position(s) for s, _ in points], [v for _, v in points]

    def x_axis(self, x: str) -> Callable[[int], float]:
        """Optimizer step -> where it is on the x-axis `x`: itself, samples seen, or epochs."""
        if x == "step":
            return lambda step: step
        if x == "samples":
            global_batch = self.facts().get("global_batch")
            if not isinstance(global_batch, int):
                raise ConfigError(
                    f"--x=samples needs the world size and batch size of run {self.path} "
                    "(environment.json, config.json), which it lacks; use --x=step"
                )
            return lambda step: step * global_batch
        steps = self.task.get("steps_per_epoch") or _steps_per_epoch(self.metrics)
        if not steps:
            raise ConfigError(
                f"--x=epoch needs the optimizer steps per epoch of run {self.path} (task.json, or an "
                "epoch's end in metrics.jsonl), which it lacks; use --x=step"
            )
        return lambda step: step / steps

    def facts(self) -> dict:
        """What config.json alone does not say: processes, the global batch, the launcher that ran it."""
        world = self.environment.get("world_size")
        batch = self.config.get("batch_size")
        global_batch = (
            GlobalBatch.of(self.config, world).samples
            if isinstance(world, int) and isinstance(batch, int)
            else "-"
        )
        return {
            "world_size": world if world is not None else "-",
            "global_batch": global_batch,
            "launcher version": (self.environment.get("versions") or {}).get("launcher") or "-",
            "launcher commit": self.environment.get("launcher_commit", "-"),
        }

    def keys(self, prefix: str) -> list[str]:
        return sorted({k for m in self.metrics for k in m if k.startswith(prefix)})

    @property
    def loss_label(self) -> str:
        """The loss's name from task.json, else from config.json's `loss` (runs from before task.json)."""
        name = self.task.get("loss") or str(self.config.get("loss", "")).replace("_", "-")
        if not name:
            return "loss"
        return name if name.endswith("loss") else f"{name} loss"


@dataclass
class Figure:
    """One plot of the report: its caption, y-axis label, and (legend label, steps, values) per line."""

    title: str
    ylabel: str
    lines: list[tuple[str, list[float], list[float]]]
    legend_columns: int = 1
    xlabel: str = X_AXES["step"]


def is_accuracy(metric: str) -> bool:
    return metric.endswith(ACCURACY_ENDINGS)


def format_value(metric: str, value: float) -> str:
    return f"{100 * value:.2f} %" if is_accuracy(metric) else f"{value:.4g}"


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
    return Run(
        name=os.path.basename(os.path.normpath(path)),
        path=path,
        config=read("config.json", {}),
        metrics=metrics,
        summary=read("summary.json", {}),
        confusion=read("confusion.json", None),
        task=read("task.json", {}),
        environment=read("environment.json", {}),
    )


def _steps_per_epoch(metrics: list[dict]) -> int | None:
    """From a run's first epoch end (its `data/` record, at the epoch's last optimizer step)."""
    end = next((m for m in metrics if "data/dropped" in m and _is_number(m.get("epoch"))), None)
    return end["step"] // (end["epoch"] + 1) if end and end["step"] else None


def config_differences(runs: list[Run]) -> list[tuple[str, list]]:
    """(field, value per run) for every config field, and every fact of `Run.facts` (processes,
    global batch, launcher version and commit), whose values are not all equal; the facts first."""
    configs = [{**run.facts(), **run.config} for run in runs]
    fields = list(runs[0].facts()) + sorted({k for run in runs for k in run.config})
    rows = []
    for name in dict.fromkeys(fields):
        values = [config.get(name, "-") for config in configs]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            rows.append((name, values))
    return rows


def validation_metrics(runs: list[Run]) -> list[str]:
    """The validation metrics any run logged (val/NAME and its EMA twin val_ema/NAME give NAME), in
    the order they first appear, less val/loss and the sample counts."""
    names: dict[str, None] = {}
    for run in runs:
        for record in run.metrics:
            for key, value in record.items():
                prefix, _, name = key.partition("/")
                if prefix in ("val", "val_ema") and name not in NOT_PLOTTED and _is_number(value):
                    names[name] = None
    return list(names)


def figure_specs(runs: list[Run], x: str = "step") -> list[Figure]:
    """Every curve plot of the report against `x` (X_AXES), without the ones no run has data for."""
    if x not in X_AXES:
        raise ConfigError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    figures = [
        _loss_figure("Training loss", runs, ["train/loss"], x),
        _loss_figure("Validation loss", runs, ["val/loss", "val_ema/loss"], x),
    ]
    for name in validation_metrics(runs):
        label = METRIC_NAMES.get(name, name)
        scale = 100 if is_accuracy(name) else 1
        figures.append(
            Figure(
                f"Validation {label}",
                f"{label} (%)" if scale == 100 else label,
                _lines(runs, [f"val/{name}", f"val_ema/{name}"], x, scale),
            )
        )
    lr_lines = [(f"{run.name}: {key[3:]}", *run.series(key, x)) for run in runs for key in run.keys("lr/")]
    figures += [
        Figure("Learning rate per parameter group", "learning rate", lr_lines, legend_columns=2),
        Figure("Throughput", "samples / s (all processes)", _lines(runs, ["train/samples_per_s"], x)),
    ]
    for figure in figures:
        figure.xlabel = X_AXES[x]
    return [figure for figure in figures if figure.lines]


def _loss_figure(title: str, runs: list[Run], keys: list[str], x: str) -> Figure:
    """The runs' loss curves; with losses of different kinds, the legend names each run's."""
    labels = {run.loss_label for run in runs if _lines([run], keys, x)}
    if len(labels) <= 1:
        return Figure(title, labels.pop() if labels else "loss", _lines(runs, keys, x))
    return Figure(
        title,
        "loss",
        [
            (f"{label} ({run.loss_label})", steps, values)
            for run in runs
            for label, steps, values in _lines([run], keys, x)
        ],
    )


def _lines(
    runs: list[Run], keys: list[str], x: str = "step", scale: float = 1
) -> list[tuple[str, list[float], list[float]]]:
    lines = []
    for run in runs:
        for key in keys:
            steps, values = run.series(key, x)
            if steps:
                lines.append((f"{run.name}: {key}", steps, [v * scale for v in values]))
    return lines


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_report(run_dirs: list[str], out: str = "", x: str = "step") -> str:
    """Write the report, curves against `x` (X_AXES); returns its path."""
    if not run_dirs:
        raise ConfigError(
            "report needs at least one RUN_DIR: python -m launcher report RUN_DIR [RUN_DIR ...]"
        )
    runs = [load_run(path) for path in run_dirs]
    out = out or (os.path.join(run_dirs[0], "report.html") if len(runs) == 1 else "report.html")
    page = render(runs, x)
    with open(out, "w") as f:
        f.write(page)
    return out


def render(runs: list[Run], x: str = "step") -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    figures = [(figure.title, _png(_draw(figure))) for figure in figure_specs(runs, x)]
    figures += [
        (f"Confusion matrix: {run.name} (step {run.confusion['step']})", _confusion(run))
        for run in runs
        if run.confusion and run.confusion.get("matrix")
    ]
    parts = [
        f"<h1>launcher report: {html.escape(', '.join(run.name for run in runs))}</h1>",
        _summary_table(runs),
        _config_table(runs),
    ]
    parts += [
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}"></figure>'
        for title, png in figures
    ]
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px} "
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
        "figure{margin:1.5em 0} figcaption{font-weight:bold;margin-bottom:.4em} img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>launcher report</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plain(text: str) -> str:
    """`text` (a run, class, metric or parameter group name) as matplotlib shows it literally: a pair
    of `$` would start mathtext, which renders the text between as maths or raises on it."""
    return str(text).replace("$", r"\$")


def _draw(spec: Figure):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.6))
    for label, steps, values in spec.lines:
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, label=plain(label))
    axes.set(xlabel=spec.xlabel, ylabel=plain(spec.ylabel))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=spec.legend_columns)
    return figure


def _confusion(run: Run) -> str:
    return _png(confusion_figure(run.confusion["matrix"], run.confusion.get("classes")))


def confusion_figure(matrix: list[list[int]], names: list[str] | None):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(matrix)
    names = [plain(name) for name in names] if names else [str(i) for i in range(len(matrix))]
    size = min(12, 3 + 0.4 * len(matrix))
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, label="validation samples")
    if len(matrix) <= 30:
        axes.set_xticks(range(len(names)), names, rotation=90)
        axes.set_yticks(range(len(names)), names)
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                axes.text(
                    col,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black",
                )
    axes.set(xlabel="predicted class", ylabel="true class")
    return figure


def _summary_table(runs: list[Run]) -> str:
    rows = [
        "<tr><th>run</th><th>directory</th><th>task</th><th>steps</th><th>best</th><th>samples seen</th>"
        "<th>time (s)</th><th>unreadable skipped</th></tr>"
    ]
    for run in runs:
        s = run.summary
        best = "-"
        if "best/metric" in s:
            value = format_value(s["best/metric"], s["best/value"])
            best = f"{s['best/metric']} {value} (step {s['best/step']})"
        cells = [
            run.name,
            run.path,
            run.task.get("task", "-"),
            s.get("steps", "-"),
            best,
            s.get("samples_seen", "-"),
            s.get("total_time_s", "-"),
            s.get("unreadable_skipped", "-"),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "<h2>Runs</h2><table>" + "".join(rows) + "</table>"


def _config_table(runs: list[Run]) -> str:
    if len(runs) == 1:
        rows, title = [*runs[0].facts().items(), *sorted(runs[0].config.items())], "Config"
        body = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in rows
        )
        return f"<h2>{title}</h2><table>{body}</table>"
    head = "<tr><th>field</th>" + "".join(f"<th>{html.escape(run.name)}</th>" for run in runs) + "</tr>"
    differences = config_differences(runs)
    body = "".join(
        "<tr><td>"
        + html.escape(name)
        + "</td>"
        + "".join(f"<td>{html.escape(json.dumps(v))}</td>" for v in values)
        + "</tr>"
        for name, values in differences
    )
    if not differences:
        body = f'<tr><td colspan="{len(runs) + 1}">the configs are identical</td></tr>'
    return f"<h2>Config differences</h2><table>{head}{body}</table>"
