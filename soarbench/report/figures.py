"""The report's figures, drawn with matplotlib (Agg, no display needed), each saved as PNG and SVG.

    from soarbench.report.figures import build_figures
    for fig in build_figures(data):          # data = soarbench.report.collect.collect([...])
        fig.save(Path("reports/x/figures"))  # NAME.png and NAME.svg

- curves: every metric against gradient steps and against the budget spent (the experiment's matched unit), one
  line per group (the mean over seeds, a shaded 95% bootstrap band from two seeds on), base model dashed;
- geneval_tasks: GenEval accuracy per task at each group's last checkpoint;
- distribution: per-sample scores (samples.jsonl; per-prompt scores where it is absent) at the last checkpoints;
- grid_methods / grid_steps: the same prompts and sampling seeds across methods, and across one run's checkpoints,
  from the eval folders' images;
- reward_hacking: for a method trained on reward X (config.toml method.rewards), every measured metric along its
  training, X marked;
- signals: the training log's signals (loss, loss_main, loss_aux, reward_mean, kl, clipfrac, grad_norm, ...)
  against the optimizer step, one line per seed.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before any pyplot import anywhere: no display on servers and CI

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from soarbench.io import atomic_write_bytes  # noqa: E402
from soarbench.report.collect import BASE_METHOD, EvalSummary, ReportData, TrainLog  # noqa: E402
from soarbench.report.tables import (  # noqa: E402
    GENEVAL_METRIC,
    GENEVAL_TASKS,
    Checkpoint,
    checkpoints,
    final_checkpoints,
    group_sort_key,
)

# Okabe-Ito colours (distinguishable with colour-blindness), without the yellow that vanishes on white.
# Okabe-Ito (colour-blind safe), then four of matplotlib's tab10 that differ from them: twelve groups before a
# colour repeats (a comparison of eight methods and its controls has ten)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
           "#9467BD", "#8C564B", "#BCBD22", "#17BECF")
BASE_COLOR = "#6b6b6b"
DPI = 100
GRID_PROMPTS = 6  # prompts (columns) in an image grid
GRID_CELL = 2.0  # inches per image: 6 prompts make a 1,320 px figure, shown at its own size on a 1,400 px page
# Text sizes (points at DPI 100) chosen so that a figure shown at its own size reads like the page's 14 px text
TITLE_SIZE, LABEL_SIZE, TICK_SIZE, LEGEND_SIZE = 13, 12, 11, 10
GRID_MAX_ROWS = 8
LOSS_SMOOTHING_POINTS_PER_SPAN = 20  # EMA span = points / 20: light smoothing, none below 40 points
LOSS_MAX_SPAN = 50
SIGNAL_ORDER = ("loss", "loss_main", "loss_aux", "reward_mean", "kl", "clipfrac", "grad_norm")
HIDDEN_SIGNALS = ("lr", "aux_points")  # schedules and counts, not training signals
HIDDEN_PREFIXES = ("prompts_",)  # the rollout prompts' task mix (counts, in the log for diagnosis)


@dataclass
class ReportFigure:
    """One figure: `name` is its file stem, `caption` says what it shows."""

    name: str
    title: str
    caption: str
    figure: Figure
    kind: str
    benchmark: str | None = None  # the benchmark it belongs to; None for figures across benchmarks

    @property
    def width_px(self) -> int:
        """The PNG's width: the page shows a figure wider than half a column across the whole page."""
        return int(round(self.figure.get_size_inches()[0] * DPI))

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        return buffer.getvalue()

    def svg(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="svg", metadata={"Date": None})
        return buffer.getvalue()

    def save(self, folder: Path) -> tuple[Path, Path]:
        png, svg = folder / f"{self.name}.png", folder / f"{self.name}.svg"
        atomic_write_bytes(png, self.png())
        atomic_write_bytes(svg, self.svg())
        return png, svg


def build_figures(data: ReportData) -> list[ReportFigure]:
    with matplotlib.rc_context({"axes.titlesize": TITLE_SIZE, "axes.labelsize": LABEL_SIZE,
                                "xtick.labelsize": TICK_SIZE, "ytick.labelsize": TICK_SIZE,
                                "legend.fontsize": LEGEND_SIZE, "figure.titlesize": TITLE_SIZE}):
        return _build_figures(data)


def _build_figures(data: ReportData) -> list[ReportFigure]:
    colors = group_colors(data)
    figures: list[ReportFigure] = []
    for bench in data.benchmarks():
        evals = data.evals_for(bench)
        figures += curve_figures(bench, evals, data, colors)
        figures += [f for f in [geneval_task_figure(bench, evals, data, colors)] if f]
        figures += distribution_figures(bench, evals, data, colors)
        figures += image_grid_figures(bench, evals, data)
    figures += reward_hacking_figures(data, colors)
    figures += signal_figures(data.train_logs, colors)
    return figures


def group_colors(data: ReportData) -> dict[str, str]:
    """One colour per group, the same in every figure; base models grey."""
    colors: dict[str, str] = {}
    trained = 0
    for group, method in sorted(data.group_methods.items(), key=lambda gm: group_sort_key(*gm)):
        if method == BASE_METHOD:
            colors[group] = BASE_COLOR
        else:
            colors[group] = PALETTE[trained % len(PALETTE)]
            trained += 1
    return colors


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _figure(n_panels: int, width: float = 5.2, height: float = 3.4, columns: int | None = None) -> tuple[Figure, list]:
    columns = columns or n_panels
    rows = math.ceil(n_panels / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.remove()
    for ax in axes[:n_panels]:
        _readable(ax)
    return fig, axes[:n_panels]


def _readable(ax) -> None:
    """Text sizes for axes drawn later (titles and labels set with ax.set(...) take these defaults)."""
    ax.tick_params(labelsize=TICK_SIZE)
    ax.xaxis.label.set_fontsize(LABEL_SIZE)
    ax.yaxis.label.set_fontsize(LABEL_SIZE)
    ax.title.set_fontsize(TITLE_SIZE)


# ---------------------------------------------------------------------------------------------------------------
# Curves


def top_level_keys(evals: Sequence[EvalSummary]) -> list[str]:
    return [k for k in dict.fromkeys(k for e in evals for k in e.scores) if "/" not in k]


def _split(cps: Sequence[Checkpoint]) -> tuple[list[Checkpoint], list[Checkpoint]]:
    return [cp for cp in cps if not cp.is_reference], [cp for cp in cps if cp.is_reference]


def plot_metric(ax, cps: Sequence[Checkpoint], key: str, x_of: Callable[[Checkpoint], float | None],
                colors: Mapping[str, str]) -> None:
    """Each trained group's mean over seeds (band: the seeds' 95% interval) and each reference model dashed."""
    trained, references = _split(cps)
    by_group: dict[str, list[Checkpoint]] = {}
    for cp in trained:
        by_group.setdefault(cp.group, []).append(cp)
    for group, members in by_group.items():
        points = sorted((x, cell) for cp in members if (x := x_of(cp)) is not None
                        and (cell := cp.score(key)) is not None)
        if not points:
            continue
        xs = np.array([x for x, _ in points], dtype=float)
        seeds = max(cp.n_seeds for cp in members)
        color = colors.get(group, PALETTE[0])
        ax.plot(xs, [c.value for _, c in points], marker="o", color=color,
                label=group if seeds == 1 else f"{group} ({seeds} seeds)")
        if any(c.has_interval for _, c in points):
            lo = [c.lo if c.has_interval else c.value for _, c in points]
            hi = [c.hi if c.has_interval else c.value for _, c in points]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    for cp in references:
        cell = cp.score(key)
        if cell is not None:
            ax.axhline(cell.value, color=colors.get(cp.group, BASE_COLOR), linestyle="--", linewidth=1.5,
                       label=cp.group)
    ax.grid(True, alpha=0.3)


def _budget_axis(trained: Sequence[Checkpoint], unit: str | None) -> str:
    """The matched unit when every trained evaluation records it, else the first counter they all record."""
    for counter in (unit, "fwd_bwd_equiv", "fwd_bwd", "images"):
        if counter and all(counter in e.budget for cp in trained for e in cp.evals):
            return counter
    return unit or "fwd_bwd"


def curve_figures(bench: str, evals: Sequence[EvalSummary], data: ReportData,
                  colors: Mapping[str, str]) -> list[ReportFigure]:
    cps = checkpoints(evals, data.group_methods)
    trained, _ = _split(cps)
    if not trained:
        return []
    unit = _budget_axis(trained, data.budget_unit())
    out = []
    for key in top_level_keys(evals):
        if all(cp.score(key) is None for cp in trained):
            continue
        fig, (by_step, by_budget) = _figure(2)
        plot_metric(by_step, cps, key, lambda cp: cp.step, colors)
        plot_metric(by_budget, cps, key, lambda cp: None if (c := cp.budget(unit)) is None else c.value, colors)
        by_step.set(xlabel="gradient steps", ylabel=key, title=f"{bench}: {key} vs steps")
        by_budget.set(xlabel=f"budget spent ({unit})", ylabel=key, title=f"{bench}: {key} vs budget")
        by_budget.legend(fontsize=LEGEND_SIZE, loc="best")
        out.append(ReportFigure(
            f"curves_{_slug(bench)}_{_slug(key)}", f"{bench}: {key} during training",
            f"{key} on {bench} against gradient steps and against the budget spent ({unit}); lines are means "
            "over seeds with the seeds' 95% bootstrap interval shaded, the base model dashed.", fig, "curves", bench))
    return out


# ---------------------------------------------------------------------------------------------------------------
# GenEval tasks and distributions


def _finals(evals: Sequence[EvalSummary], data: ReportData, key: str) -> list[Checkpoint]:
    return final_checkpoints(checkpoints([e for e in evals if key in e.scores], data.group_methods), key)


def geneval_task_figure(bench: str, evals: Sequence[EvalSummary], data: ReportData,
                        colors: Mapping[str, str]) -> ReportFigure | None:
    tasks = [t for t in GENEVAL_TASKS if any(f"{GENEVAL_METRIC}/{t}" in e.scores for e in evals)]
    finals = _finals(evals, data, GENEVAL_METRIC)
    if not tasks or not finals:
        return None
    fig, (ax,) = _figure(1, width=8.0)
    width = 0.8 / len(finals)
    for i, cp in enumerate(finals):
        cells = [cp.score(f"{GENEVAL_METRIC}/{t}") for t in tasks]
        values = [c.value if c else math.nan for c in cells]
        errors = np.array([[c.value - c.lo, c.hi - c.value] if c and c.has_interval else [0, 0] for c in cells]).T
        xs = np.arange(len(tasks)) + (i - (len(finals) - 1) / 2) * width
        ax.bar(xs, values, width, yerr=errors if errors.any() else None, color=colors.get(cp.group, PALETTE[0]),
               label=f"{cp.label} (overall {cp.score(GENEVAL_METRIC).value:.3f})", capsize=2)
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", " ") for t in tasks])
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=f"{bench}: GenEval accuracy per task")
    ax.legend(fontsize=LEGEND_SIZE)
    ax.grid(True, axis="y", alpha=0.3)
    return ReportFigure(f"geneval_tasks_{_slug(bench)}", f"{bench}: GenEval per task",
                        "GenEval accuracy per task at each group's last checkpoint (error bars: the seeds' 95% "
                        "interval).", fig, "geneval_tasks", bench)


def sample_scores(e: EvalSummary, metric: str) -> list[float]:
    """Per-image scores from samples.jsonl (records.METRIC.score), else the summary's per-prompt scores."""
    path = e.eval_dir / "samples.jsonl"
    values = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line).get("records", {}).get(metric, {})
            score = record.get("score") if isinstance(record, dict) else None
            if isinstance(score, (int, float)) and math.isfinite(score):
                values.append(float(score))
    if not values:
        values = [v for v in e.per_prompt.get(metric, ()) if math.isfinite(v)]
    return values


def distribution_figures(bench: str, evals: Sequence[EvalSummary], data: ReportData,
                         colors: Mapping[str, str]) -> list[ReportFigure]:
    out = []
    for key in top_level_keys(evals):
        finals = _finals(evals, data, key)
        samples = [(cp, [v for e in cp.evals for v in sample_scores(e, key)]) for cp in finals]
        samples = [(cp, v) for cp, v in samples if v]
        if not samples:
            continue
        if _binary(samples):
            out.append(_share_figure(bench, key, samples, colors))
            continue
        fig, (ax,) = _figure(1, width=max(4.0, 1.3 * len(samples) + 2))
        rng = np.random.default_rng(0)  # jitter only; fixed so the figure is the same every time
        ax.boxplot([v for _, v in samples], widths=0.5, showfliers=False)
        for i, (cp, values) in enumerate(samples, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5,
                       color=colors.get(cp.group, PALETTE[0]))
            ax.plot([i - 0.25, i + 0.25], [np.mean(values)] * 2, color="black", linewidth=2)
        ax.set_xticks(range(1, len(samples) + 1), [f"{cp.label}\n(n={len(v)})" for cp, v in samples])
        ax.set(ylabel=key, title=f"{bench}: per-sample {key}")
        ax.grid(True, axis="y", alpha=0.3)
        out.append(ReportFigure(f"distribution_{_slug(bench)}_{_slug(key)}", f"{bench}: {key} per sample",
                                f"Per-sample {key} at each group's last checkpoint, seeds pooled (box: quartiles; "
                                "black bar: mean).", fig, "distribution", bench))
    return out


def _binary(samples: Sequence[tuple[Checkpoint, list[float]]]) -> bool:
    """Every per-sample score is 0 or 1 (GenEval's per-image verdicts): quartiles of such data say nothing."""
    return all(v in (0.0, 1.0) for _, values in samples for v in values)


def _share_figure(bench: str, key: str, samples: Sequence[tuple[Checkpoint, list[float]]],
                  colors: Mapping[str, str]) -> ReportFigure:
    """A 0/1 metric per group: the share of images scored 1, a bar with its 95% bootstrap interval over images."""
    from soarbench.report.stats import bootstrap_ci

    fig, (ax,) = _figure(1, width=max(5.0, 1.4 * len(samples) + 2))
    for i, (cp, values) in enumerate(samples):
        ci = bootstrap_ci(values)
        ax.bar(i, ci.mean, 0.6, yerr=[[ci.mean - ci.lo], [ci.hi - ci.mean]], capsize=6,
               color=colors.get(cp.group, PALETTE[0]))
        ax.text(i, ci.hi + 0.02, f"{ci.mean:.3f}\n{int(sum(values))}/{len(values)}", ha="center", va="bottom",
                fontsize=TICK_SIZE)
    ax.set_xticks(range(len(samples)), [cp.label for cp, _ in samples])
    ax.set(ylabel=f"{key}: share of images scored 1", ylim=(0, 1.15), title=f"{bench}: {key} per image (0 or 1)")
    ax.grid(True, axis="y", alpha=0.3)
    return ReportFigure(f"distribution_{_slug(bench)}_{_slug(key)}", f"{bench}: {key} per image",
                        f"{key} scores each image 0 or 1: the bar is the share of images scored 1 at each group's "
                        "last checkpoint (seeds pooled; k/n above it), the error bar its 95% bootstrap interval "
                        "over images.", fig, "distribution", bench)


# ---------------------------------------------------------------------------------------------------------------
# Image grids


def _samples(e: EvalSummary) -> dict[str, dict]:
    path = e.eval_dir / "samples.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(r.get("id")): r for r in rows if r.get("file")}


def _grid(rows: Sequence[tuple[str, EvalSummary]], title: str) -> tuple[Figure, bool] | None:
    """Images of the same sample ids (prompt and image index) in every row; True when their seeds all agree."""
    tables = [(label, e, _samples(e)) for label, e in rows]
    tables = [t for t in tables if t[2]]
    if len(tables) < 2:
        return None
    common = [i for i in tables[0][2] if all(i in samples for _, _, samples in tables)]
    firsts = [i for i in common if tables[0][2][i].get("image_index", 0) == 0][:GRID_PROMPTS]
    if not firsts:
        return None
    same_seeds = all(len({samples[i].get("seed") for _, _, samples in tables}) == 1 for i in firsts)
    fig = Figure(figsize=(GRID_CELL * len(firsts) + 1.2, GRID_CELL * len(tables) + 1.0), layout="constrained")
    axes = fig.subplots(len(tables), len(firsts), squeeze=False)
    for r, (label, e, samples) in enumerate(tables):
        for c, sample_id in enumerate(firsts):
            ax = axes[r][c]
            with Image.open(e.eval_dir / samples[sample_id]["file"]) as image:
                ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(_wrap(samples[sample_id].get("prompt", sample_id)), fontsize=LABEL_SIZE - 1)
            if c == 0:
                ax.set_ylabel(label, fontsize=LABEL_SIZE)
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig, same_seeds


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line][:3])


def _seed_note(same: bool) -> str:
    return ("Every row used the same sampling seeds." if same else
            "Warning: the rows' sampling seeds differ; the images are not like-for-like.")


def image_grid_figures(bench: str, evals: Sequence[EvalSummary], data: ReportData) -> list[ReportFigure]:
    key = next(iter(top_level_keys(evals)), None)
    if key is None:
        return []
    out = []
    finals = _finals(evals, data, key)
    rows = [(cp.label, min(cp.evals, key=lambda e: (e.seed is None, e.seed or 0))) for cp in finals]
    made = _grid(rows, f"{bench}: the same prompts across methods (last checkpoints, first seed)")
    if made:
        out.append(ReportFigure(f"grid_methods_{_slug(bench)}", f"{bench}: images across methods",
                                "The first image of the same prompts for each group's last checkpoint. "
                                + _seed_note(made[1]), made[0], "grid", bench))
    base = [e for e in evals if data.group_methods.get(e.group) == BASE_METHOD]
    runs: dict[str, list[EvalSummary]] = {}
    for e in evals:
        if data.group_methods.get(e.group) != BASE_METHOD and e.step is not None:
            runs.setdefault(e.run_name, []).append(e)
    firsts: dict[str, str] = {}  # group -> its first run (lowest seed)
    for run, members in sorted(runs.items(), key=lambda r: (r[1][0].seed is None, r[1][0].seed or 0, r[0])):
        firsts.setdefault(members[0].group, run)
    for group in sorted(firsts, key=lambda g: group_sort_key(g, data.group_methods.get(g, ""))):
        run = firsts[group]
        steps = sorted(runs[run], key=lambda e: e.step)
        if len(steps) > GRID_MAX_ROWS - 1:  # keep the first and last, thin the middle evenly
            picks = np.linspace(0, len(steps) - 1, GRID_MAX_ROWS - 1).round().astype(int)
            steps = [steps[i] for i in dict.fromkeys(picks.tolist())]
        rows = [("base", e) for e in base[:1]] + [(f"{group}@{e.step}", e) for e in steps]
        made = _grid(rows, f"{bench}: {run} across checkpoints")
        if made:
            out.append(ReportFigure(f"grid_steps_{_slug(bench)}_{_slug(run)}", f"{bench}: {run} across checkpoints",
                                    f"The same prompts from the base model and {run}'s checkpoints. "
                                    + _seed_note(made[1]), made[0], "grid", bench))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reward hacking and training signals


def reward_hacking_figures(data: ReportData, colors: Mapping[str, str]) -> list[ReportFigure]:
    """For each group trained on rewards: every measured metric (all benchmarks) against its training steps."""
    out = []
    for group in sorted(data.group_methods, key=lambda g: group_sort_key(g, data.group_methods[g])):
        rewards = data.rewards_of(group)
        if not rewards:
            continue
        panels = []
        for bench in data.benchmarks():
            evals = [e for e in data.evals_for(bench)
                     if e.group == group or data.group_methods.get(e.group) == BASE_METHOD]
            panels += [(bench, key, evals) for key in top_level_keys(evals)
                       if any(e.group == group and key in e.scores for e in evals)]
        if not panels:
            continue
        fig, axes = _figure(len(panels), width=4.4, height=3.2, columns=min(3, len(panels)))
        for ax, (bench, key, evals) in zip(axes, panels):
            plot_metric(ax, checkpoints(evals, data.group_methods), key, lambda cp: cp.step, colors)
            trained_on = key in rewards or key.split("/")[0] in rewards
            ax.set(xlabel="gradient steps", ylabel=key,
                   title=f"{key} ({bench})" + (" — trained on" if trained_on else ""))
            if trained_on:
                ax.title.set_color("#D55E00")
        axes[0].legend(fontsize=LEGEND_SIZE)
        names = ", ".join(f"{k} x {w:g}" for k, w in rewards.items())
        out.append(ReportFigure(f"reward_hacking_{_slug(group)}", f"{group}: every metric while training on {names}",
                                f"{group} was trained on the reward {names}; each panel is another measured metric "
                                "along its training (a rising reward with falling other metrics is reward hacking).",
                                fig, "reward_hacking"))
    return out


def signal_figures(logs: Sequence[TrainLog], colors: Mapping[str, str]) -> list[ReportFigure]:
    """Per group, one panel per training signal in its logs, one line per seed."""
    by_group: dict[str, list[TrainLog]] = {}
    for log in sorted(logs, key=lambda lg: (group_sort_key(lg.group, lg.method), lg.run_name)):
        by_group.setdefault(log.group, []).append(log)
    out = []
    for group, members in by_group.items():
        names = list(dict.fromkeys(n for log in members for n in log.signals
                                   if n not in HIDDEN_SIGNALS and not n.startswith(HIDDEN_PREFIXES)))
        names = sorted(names, key=lambda n: (SIGNAL_ORDER.index(n) if n in SIGNAL_ORDER else len(SIGNAL_ORDER), n))
        if not any("loss" == n for n in names) and any(np.isfinite(log.losses).any() for log in members):
            names.insert(0, "loss")
        names = [n for n in dict.fromkeys(names)]
        if not names:
            continue
        fig, axes = _figure(len(names), width=4.4, height=3.2, columns=min(3, len(names)))
        color = colors.get(group, PALETTE[0])
        for ax, name in zip(axes, names):
            for i, log in enumerate(members):
                values = log.losses if name == "loss" and name not in log.signals else log.signals.get(name)
                if values is None:
                    continue
                style = dict(color=color, linestyle="-" if i == 0 else ":", label=log.run_name)
                span = smoothing_span(len(values))
                if span == 1:
                    ax.plot(log.steps, values, linewidth=1.2, alpha=1.0 if i == 0 else 0.6, **style)
                else:  # the raw signal faint, an EMA over it: noisy per-step values stay readable
                    ax.plot(log.steps, values, linewidth=0.8, alpha=0.25, color=color)
                    ax.plot(log.steps, ema(np.asarray(values, dtype=float), span), linewidth=1.4, **style)
            ax.set(xlabel="optimizer step", title=name)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=LEGEND_SIZE)
        out.append(ReportFigure(f"signals_{_slug(group)}", f"{group}: training signals",
                                f"What {group}'s training logged at every optimizer step (one line per seed; from "
                                f"{2 * LOSS_SMOOTHING_POINTS_PER_SPAN} steps on, faint raw values under an "
                                "exponential moving average).", fig, "signals"))
    return out


def smoothing_span(n_points: int) -> int:
    return max(1, min(LOSS_MAX_SPAN, n_points // LOSS_SMOOTHING_POINTS_PER_SPAN))


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected so that it starts at the data.

    A NaN (a step whose value was not finite) stays NaN in the output and leaves the average untouched.
    """
    alpha = 2.0 / (span + 1)
    out = np.full(values.shape, math.nan)
    average = weight = 0.0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            continue
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out[i] = average / weight
    return out
