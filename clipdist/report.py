"""Plots and a one-page summary of a run, without a dashboard.

    python -m clipdist.report runs/digits            # writes runs/digits/report/
    python -m clipdist.report runs/digits --out /tmp/r

Reads the run's metrics.jsonl (and summary.json, run_info.json when present) and writes PNGs
against samples seen: loss.png, lr.png, logit_scale.png, zero_shot.png, retrieval.png and
data.png where the run logged those metrics, and report.md linking them.

A resumed run appends to metrics.jsonl, so a step may appear twice. Rule: a row whose step is
lower than an earlier row's starts a new launch, and every earlier row at or after that step is
dropped (the resumed launch trained those steps again); rows of one step are then merged, later
values winning (train and eval rows of a step, or a step logged by both launches).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SAMPLES_SEEN = "train/samples_seen"  # the x axis; clipdist.log writes it into every row
FIGSIZE, DPI = (8.0, 4.5), 100  # 800 × 450 px
_OLD_EVAL_NAME = re.compile(r"^eval/(?P<set>.+)_(?P<metric>top\d+|count)$")  # eval/zero_shot_top1
_ZERO_SHOT_METRIC = re.compile(r"^top\d+$")


class ReportError(ValueError):
    """The run directory cannot be reported on; the message names the file."""


@dataclass
class Series:
    x: List[float] = field(default_factory=list)  # samples seen
    y: List[float] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(path: Path) -> List[Dict[str, Any]]:
    """metrics.jsonl rows; a cut-off last line (a run killed mid-write) is ignored."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is this a clipdist run directory?)")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ReportError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}, line {number}: expected an object with an integer \"step\"")
        rows.append(row)
    return rows


def merge_steps(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per step, in step order, after dropping what a resumed launch trained again
    (the module docstring states the rule)."""
    kept: List[Dict[str, Any]] = []
    for row in rows:
        if kept and row["step"] < kept[-1]["step"]:  # kept is in step order: it only grows
            kept = [r for r in kept if r["step"] < row["step"]]
        kept.append(row)
    merged: Dict[int, Dict[str, Any]] = {}
    for row in kept:
        merged.setdefault(row["step"], {}).update(row)
    return [merged[step] for step in sorted(merged)]


def read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not JSON ({error.msg})") from None


def samples_seen(row: Dict[str, Any]) -> Optional[float]:
    """The row's x; rows of runs older than train/samples_seen in every row use step × batch."""
    if SAMPLES_SEEN in row:
        return float(row[SAMPLES_SEEN])
    if "train/global_batch" in row:
        return float(row["step"] * row["train/global_batch"])
    return None


def series(rows: Sequence[Dict[str, Any]], key: str) -> Series:
    out = Series()
    for row in rows:
        value, x = row.get(key), samples_seen(row)
        if isinstance(value, (int, float)) and x is not None and math.isfinite(value):
            out.x.append(x)
            out.y.append(float(value))
            out.steps.append(row["step"])
    return out


def eval_name(key: str) -> Optional[Tuple[str, str]]:
    """(set, metric) of an eval key: eval/<set>/<metric>, or the older eval/<set>_top1."""
    if not key.startswith("eval/"):
        return None
    rest = key[len("eval/") :]
    if "/" in rest:
        eval_set, metric = rest.rsplit("/", 1)
        return eval_set, metric
    old = _OLD_EVAL_NAME.match(key)
    return (old["set"], old["metric"]) if old else ("eval", rest)


def eval_keys(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, str]]:
    """{set: {metric: key}} over every eval metric the run logged, in first-seen order."""
    found: Dict[str, Dict[str, str]] = {}
    for row in rows:
        for key in row:
            name = eval_name(key)
            if name:
                found.setdefault(name[0], {})[name[1]] = key
    return found


def is_retrieval(metric: str) -> bool:
    return "R@" in metric or "recall" in metric.lower()


# ---------------------------------------------------------------------------------------------
# Plots


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("plots need matplotlib: pip install 'clipdist[report]'") from None
    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    return plt


def _axes(plt, title: str, ylabel: str, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=FIGSIZE, dpi=DPI, squeeze=False)
    from matplotlib.ticker import EngFormatter

    for ax in axes[0]:
        ax.set_xlabel("samples seen")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 12k, 1.5M
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_curve(plt, path: Path, title: str, ylabel: str, s: Series) -> Path:
    """One training curve; a long noisy one also gets its moving average."""
    fig, (ax,) = _axes(plt, title, ylabel)
    window = len(s.y) // 25
    if window >= 3:
        ax.plot(s.x, s.y, alpha=0.3, label="logged")
        prefix = [0.0, *itertools.accumulate(s.y)]
        smooth = [(prefix[i + 1] - prefix[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(s.y))]
        ax.plot(s.x, smooth, color="C0", label=f"mean of the last {window} logged")
        ax.legend(fontsize="small")
    else:
        ax.plot(s.x, s.y, marker="o" if len(s.x) < 30 else None, markersize=3)
    return _save(plt, fig, path)


def plot_evals(plt, path: Path, title: str, ylabel: str, by_set: Dict[str, Dict[str, Series]]) -> Path:
    """Eval metrics in percent: a colour per eval set, a line style per metric (top1 solid, top5 dashed)."""
    fig, (ax,) = _axes(plt, title, ylabel)
    styles = ["-", "--", ":", "-."]
    metrics = sorted({m for ms in by_set.values() for m in ms})
    for color, (eval_set, ms) in enumerate(by_set.items()):
        for metric, s in ms.items():
            style = styles[metrics.index(metric) % len(styles)]
            ax.plot(s.x, [100 * v for v in s.y], style, color=f"C{color % 10}", marker="o", markersize=3, label=f"{eval_set} {metric}")
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def plot_data(plt, path: Path, rows: Sequence[Dict[str, Any]]) -> Path:
    """Rows replaced by reason (cumulative) and the mix of sources, over samples seen."""
    keys = sorted({k for row in rows for k in row if k.startswith("data/skipped/") or k.startswith("data/mix/")})
    fig, (skipped_ax, mix_ax) = _axes(plt, "data", "rows replaced (cumulative)", ncols=2)
    for key in keys:
        s = series(rows, key)
        if key.startswith("data/skipped/") and any(s.y):
            skipped_ax.plot(s.x, s.y, label=key.split("/")[-1])
        elif key.startswith("data/mix/"):
            mix_ax.plot(s.x, [100 * v for v in s.y], label=key.split("/")[-1])
    mix_ax.set_ylabel("share of rows trained (%)")
    mix_ax.set_ylim(0, 105)
    for ax, empty in ((skipped_ax, "no rows replaced"), (mix_ax, "no mix logged")):
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center")
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------
# The report

TRAINING_CURVES = (
    ("train/loss", "loss.png", "training loss", "loss"),
    ("train/lr", "lr.png", "learning rate", "lr"),
    ("train/logit_scale", "logit_scale.png", "logit scale (inverse temperature)", "logit scale"),
)


def write_report(run_dir: Path, out_dir: Optional[Path] = None) -> Path:
    """Write the PNGs and report.md for ``run_dir`` into ``out_dir`` (default run_dir/report);
    return report.md's path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    rows = merge_steps(read_rows(run_dir / "metrics.jsonl"))
    summary, info = read_json(run_dir / "summary.json"), read_json(run_dir / "run_info.json")
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)

    sections = [overview(run_dir, rows, summary, info), "## Training", ""]
    for key, name, title, ylabel in TRAINING_CURVES:
        s = series(rows, key)
        if s.x:
            plot_curve(plt, out_dir / name, title, ylabel, s)
            sections += [f"![{title}]({name})", ""]
        else:
            sections += [f"No `{key}` logged: {name} not drawn.", ""]

    evals = eval_keys(rows)
    for heading, name, keep, missing in (
        ("Zero-shot accuracy", "zero_shot.png", _ZERO_SHOT_METRIC.match, "No zero-shot eval metrics logged (no eval sets configured?): zero_shot.png not drawn."),
        ("Retrieval recall", "retrieval.png", is_retrieval, None),
    ):
        by_set = {eval_set: {m: series(rows, key) for m, key in ms.items() if keep(m)} for eval_set, ms in evals.items()}
        by_set = {eval_set: {m: s for m, s in ms.items() if s.x} for eval_set, ms in by_set.items()}
        by_set = {eval_set: ms for eval_set, ms in by_set.items() if ms}
        if by_set:
            plot_evals(plt, out_dir / name, heading.lower(), heading.split()[-1] + " (%)", by_set)
            sections += [f"## {heading}", "", *eval_table(by_set), "", f"![{heading.lower()}]({name})", ""]
        elif missing:
            sections += [f"## {heading}", "", missing, ""]

    if any(k.startswith("data/") for row in rows for k in row):
        plot_data(plt, out_dir / "data.png", rows)
        sections += [*data_section(rows, summary), "![data](data.png)", ""]

    report = out_dir / "report.md"
    report.write_text("\n".join(sections))
    return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _last(rows: Sequence[Dict[str, Any]], key: str) -> Optional[Any]:
    return next((row[key] for row in reversed(rows) if key in row), None)


def overview(run_dir: Path, rows, summary: Dict[str, Any], info: Dict[str, Any]) -> str:
    """Title and a table of what is known about the run (unknown rows are left out)."""
    config = info.get("config", {})
    name = config.get("logging", {}).get("run_name") or run_dir.name
    git = info.get("git") or {}
    seen = _last(rows, SAMPLES_SEEN)
    batch = summary.get("global_batch") or _last(rows, "train/global_batch")
    world = summary.get("world_size") or info.get("world_size")
    fields = [
        ("model", summary.get("model") or config.get("model", {}).get("name")),
        ("code", git.get("commit") and f"{git['commit'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"),
        ("world size", world),
        ("global batch", int(batch) if batch is not None else None),
        ("steps", rows[-1]["step"] if rows else 0),
        ("samples seen", int(seen) if seen is not None else None),
        ("final loss", _last(rows, "train/loss")),
        ("training time (s)", summary.get("train_seconds")),
        ("samples per second", summary.get("samples_per_second")),
    ]
    table = [f"| {label} | {_fmt(value)} |" for label, value in fields if value is not None]
    return "\n".join([f"# Run `{name}`", "", f"`{run_dir}`", "", "| | |", "| --- | --- |", *table, ""])


def eval_table(by_set: Dict[str, Dict[str, Series]]) -> List[str]:
    """Best and final value per eval set and metric."""
    lines = ["| set | metric | best | final |", "| --- | --- | --- | --- |"]
    for eval_set, metrics in by_set.items():
        for metric, s in metrics.items():
            best = max(range(len(s.y)), key=lambda i: s.y[i])
            lines.append(f"| {eval_set} | {metric} | {_pct(s.y[best])} at {int(s.x[best]):,} samples (step {s.steps[best]}) | {_pct(s.y[-1])} |")
    return lines


def data_section(rows: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> List[str]:
    """Rows trained, replaced by reason, and the mix, at the end of the run."""
    final = dict(summary.get("data") or {})
    for key in {k for row in rows for k in row if k.startswith("data/")}:
        final.setdefault(key, _last(rows, key))
    skipped = {k.split("/")[-1]: int(v) for k, v in sorted(final.items()) if k.startswith("data/skipped/") and v}
    mix = {k.split("/")[-1]: v for k, v in sorted(final.items()) if k.startswith("data/mix/")}
    lines = ["## Data", ""]
    if final.get("data/rows") is not None:
        lines.append(f"- rows trained: {int(final['data/rows']):,}")
    lines.append("- rows replaced: " + (", ".join(f"{reason} {n:,}" for reason, n in skipped.items()) or "none"))
    if mix:
        lines.append("- mix: " + ", ".join(f"{source} {100 * share:.1f} %" for source, share in mix.items()))
    return lines + [""]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipdist.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (train.output_dir), holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs and report.md (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dir, args.out)
    except ReportError as error:
        print(f"clipdist.report: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
