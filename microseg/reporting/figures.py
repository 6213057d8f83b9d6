"""Every figure: loss curves, stratified bars (per slice, per patient), contour overlays, the phantom preview;
Agg backend, atomic PNGs.

Colours: one per run, the same in every figure of a comparison (`run_colours`, by the runs'
order), from RUN_COLOURS (matplotlib's tab10 without its green and grey); the expert is drawn in
EXPERT_COLOUR, which no run gets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from microseg.core.atomic import atomic_path
from microseg.core.errors import MicrosegError
from microseg.core.preprocess import INTENSITY_MAX
from microseg.data.layout import EXPERT, IMAGES, NON_EXPERT, file_name
from microseg.data.volumes import read_volume
from microseg.evaluation.analysis import FACTORS, bool_volumes
from microseg.metrics import dice

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

EXPERT_COLOUR = "#00ff00"
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def run_colours(runs: Sequence[str]) -> dict[str, str]:
    """Each run's colour, by its position (the palette repeats after len(RUN_COLOURS) runs)."""
    return {run: RUN_COLOURS[i % len(RUN_COLOURS)] for i, run in enumerate(dict.fromkeys(runs))}


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed). A run name in a script the font lacks
    (CJK, say) is drawn as boxes, without matplotlib's warning for every glyph."""
    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> None:
    """Write `fig` as a PNG through a temporary name, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)


def plot_loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, colours: Mapping[str, str] | None = None
) -> None:
    """Three panels across epochs: own loss, common-ruler BCE, validation DSC (if any run has it).

    `histories`: run label -> its history rows (epoch, loss, bce, val_dsc ...).
    """
    plt = pyplot()
    colours = colours or run_colours(list(histories))
    panels = [("loss", "own training loss"), ("bce", "common-ruler BCE (main output)")]
    if any("val_dsc" in rows[0] for rows in histories.values() if rows):
        panels.append(("val_dsc", "validation DSC"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for run, rows in histories.items():
            epochs = [row["epoch"] for row in rows if key in row]
            values = [row[key] for row in rows if key in row]
            ax.plot(epochs, values, marker="o", label=run, color=colours[run])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Comparison of losses over epochs")
    fig.tight_layout()
    save_png(fig, path)


PANEL_TITLES = {
    "size": "by object size (expert area tertiles)",
    "roughness": "by boundary roughness (P\u00b2/4\u03c0A tertiles)",
    "volume": "by patient volume (expert ml tertiles)",
    "smoothness": "by patient smoothness (\u03b3_mSa tertiles)",
}


def plot_stratified(
    header: Sequence[str],
    rows: Sequence[Sequence],
    out_png: str | Path,
    colours: Mapping[str, str] | None = None,
    factors: Sequence[tuple] = FACTORS,
) -> None:
    """A-FL Fig. 3 layout: one panel per factor (per slice: size, roughness; per patient: volume,
    smoothness), one group of bars per stratum, one bar per run, error bars = std, mean DSC
    written above each bar. `header` is [run, factor, stratum, mean_dsc, std_dsc, n_slices |
    n_patients]; the last column says what was averaged."""
    plt = pyplot()
    col = {name: i for i, name in enumerate(header)}
    count = header[-1]
    runs = list(dict.fromkeys(row[col["run"]] for row in rows))
    colours = colours or run_colours(runs)
    cell = {(r[col["run"]], r[col["factor"]], r[col["stratum"]]): r for r in rows}
    lows = [r[col["mean_dsc"]] - r[col["std_dsc"]] for r in rows if r[col[count]]]
    bottom = max(0.0, math.floor(20 * min(lows, default=0.0)) / 20 - 0.05)  # zoom on the bars' range
    fig, axes = plt.subplots(1, len(factors), figsize=(5.5 * len(factors), 4.4), layout="constrained", squeeze=False)
    width = 0.8 / max(1, len(runs))
    unit = count.removeprefix("n_").removesuffix("s")
    for ax, (factor, _, labels) in zip(axes[0], factors, strict=True):
        x = np.arange(len(labels))
        for i, run in enumerate(runs):
            got = [cell.get((run, factor, label)) for label in labels]
            mean = [r[col["mean_dsc"]] if r else math.nan for r in got]
            std = [r[col["std_dsc"]] if r else math.nan for r in got]
            bars = ax.bar(
                x + (i - (len(runs) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=run, color=colours[run]
            )
            ax.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.3f}" for m in mean], fontsize=7, padding=2)
        ax.set_xticks(x, labels)
        ax.set_ylim(bottom, 1.0)
        ax.set_ylabel(f"mean {unit} DSC")
        ax.set_title(PANEL_TITLES.get(factor, factor))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{unit.capitalize()} DSC stratified by " + " and ".join(f[0] for f in factors))
    fig.legend(
        *axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=len(runs), fontsize=8, frameon=False
    )
    save_png(fig, out_png)


def _crop(masks: Sequence[np.ndarray], shape: tuple[int, int], margin: float = 0.25) -> tuple[slice, slice]:
    """The bounding box of the union of 2D masks grown by `margin` of its size (>= 8 px); whole image if empty."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return slice(0, shape[0]), slice(0, shape[1])
    box = []
    for axis, size in enumerate(shape):
        hits = np.flatnonzero(union.any(1 - axis))
        pad = max(8, int(margin * (hits[-1] + 1 - hits[0])))
        box.append(slice(max(0, hits[0] - pad), min(size, hits[-1] + 1 + pad)))
    return box[0], box[1]


def plot_overlays(
    image: np.ndarray,
    expert: np.ndarray,
    preds: Mapping[str, np.ndarray],
    slices: Sequence[int],
    out_png: str | Path,
    title: str,
    crop: bool = True,
    colours: Mapping[str, str] | None = None,
) -> None:
    """Micro-US adaptive focal Figs. 4-6: one row per run, one column per slice; each panel shows the image in
    grey, the expert contour in EXPERT_COLOUR and that run's contour in the run's colour (legend below),
    with the slice's DSC. Contours: matplotlib `contour` at level 0.5 on the native-resolution
    masks. crop=True zooms each column on the union of its masks plus a 25% margin.
    No runs: a single row with the expert contour alone.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D

    image, expert, masks, slices = _overlay_volumes(image, expert, preds, slices)
    colours = colours or run_colours(list(preds))
    runs: list[tuple[str, np.ndarray | None, str | None]] = [
        (run, mask, colours[run]) for run, mask in zip(preds, masks, strict=True)
    ]
    full = (slice(0, image.shape[1]), slice(0, image.shape[2]))
    boxes = [_crop([expert[z]] + [m[z] for m in masks], image.shape[1:]) if crop else full for z in slices]
    aspect = np.mean([(b[0].stop - b[0].start) / (b[1].stop - b[1].start) for b in boxes])
    panel = 3.2  # inches per column
    fig, axes = plt.subplots(
        max(1, len(runs)),
        len(slices),
        squeeze=False,
        layout="constrained",
        figsize=(panel * len(slices), (panel * aspect + 0.3) * max(1, len(runs)) + 0.7),
    )
    for col, (z, box) in enumerate(zip(slices, boxes, strict=True)):
        for row, (run, mask, colour) in enumerate(runs or [("expert only", None, None)]):
            ax = axes[row][col]
            _overlay_panel(ax, image[z], expert[z], None if mask is None else (mask[z], colour), box, f"z = {z}")
            if col == 0:
                ax.set_ylabel(run, fontsize=9)
    handles = [Line2D([], [], color=EXPERT_COLOUR, lw=2, label="expert")]
    handles += [Line2D([], [], color=colour, lw=2, label=run) for run, _, colour in runs]
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    save_png(fig, out_png)


def _overlay_volumes(
    image: np.ndarray, expert: np.ndarray, preds: Mapping[str, np.ndarray], slices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[int]]:
    """`plot_overlays`' inputs checked: the [Z,H,W] image, the expert's and each run's bool masks of
    its shape, and the slice indices (integers inside the volume) as ints."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise MicrosegError(f"image must be a [Z,H,W] volume, got shape {image.shape}")
    expert, *masks = bool_volumes(expert=expert, **{f"prediction of {run}": p for run, p in preds.items()})
    if expert.shape != image.shape:
        raise MicrosegError(f"expert shape {expert.shape} does not match image shape {image.shape}")
    if not len(slices):
        raise MicrosegError("no slices to overlay")
    for z in slices:
        if isinstance(z, bool) or int(z) != z or not 0 <= z < len(image):
            raise MicrosegError(f"slice index {z!r} is outside the volume (0..{len(image) - 1})")
    return image, expert, masks, [int(z) for z in slices]


def _overlay_panel(
    ax: Axes,
    image: np.ndarray,
    expert: np.ndarray,
    run: tuple[np.ndarray, str | None] | None,
    box: tuple[slice, slice],
    label: str,
) -> None:
    """One slice's panel, cropped to `box`: the image in grey, the expert's contour and the run's (its
    mask and colour; None: the expert alone), titled `label` and the run's DSC on the whole slice."""
    ax.imshow(image[box], cmap="gray", vmin=0, vmax=255)
    for contour, c in [(expert, EXPERT_COLOUR)] + ([run] if run is not None else []):
        part = contour[box]
        if part.any() and not part.all():  # a constant crop has no 0.5 level
            ax.contour(part.astype(np.float32), levels=[0.5], colors=c, linewidths=1.2)
    if run is not None and (run[0].any() or expert.any()):
        label += f"   DSC {dice(run[0], expert):.3f}"
    ax.set_title(label, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_case_preview(data_root: str | Path, split: str = "train", case_id: str = "01", n_panels: int = 8) -> Path:
    """``<data_root>/preview.png``, a montage of one case: slices across the sweep, expert (green) and non-expert (red) contours."""
    plt = pyplot()
    root = Path(data_root) / split
    image = read_volume(root / IMAGES[0] / file_name(IMAGES, split, case_id)).array
    expert = read_volume(root / EXPERT[0] / file_name(EXPERT, split, case_id), "mask").array
    non_expert = read_volume(root / NON_EXPERT[0] / file_name(NON_EXPERT, split, case_id), "mask").array
    slices = np.unique(np.linspace(0, len(image) - 1, n_panels).round().astype(int))
    cols = min(4, len(slices))
    rows = math.ceil(len(slices) / cols)
    h, w = image.shape[1:]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * h / w + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, slices, strict=False):
        ax.imshow(image[z], cmap="gray", vmin=0, vmax=INTENSITY_MAX, interpolation="nearest")
        for mask, colour in ((expert[z], "lime"), (non_expert[z], "red")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"slice {z}", fontsize=8)
    fig.suptitle(f"{split} {case_id}: expert (green), non-expert (red)", fontsize=9)
    fig.tight_layout()
    target = Path(data_root) / "preview.png"
    save_png(fig, target, dpi=110)
    return target


CURVE_PANELS = (("loss", "own training loss"), ("bce", "common-ruler BCE (main output)"), ("val_dsc", "validation DSC"))


def plot_curve_bands(
    bands: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: Path,
    band: str,
    colours: Mapping[str, str] | None = None,
) -> None:
    """Loss curves of repeated runs: per panel (CURVE_PANELS that any loss has) a line per loss
    (the mean over its runs per epoch) and a shaded band (`band` says which, e.g. "min-max over
    seeds and folds").

    `bands`: loss -> history column -> rows (epoch, mean, low, high).
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    colours = colours or run_colours(list(bands))
    panels = [(key, title) for key, title in CURVE_PANELS if any(curves.get(key) for curves in bands.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.9), squeeze=False, layout="constrained")
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for loss, curves in bands.items():
            rows = np.array(curves.get(key) or np.empty((0, 4)), dtype=np.float64).reshape(-1, 4)
            ax.plot(rows[:, 0], rows[:, 1], marker="o", markersize=3, label=loss, color=colours[loss])
            ax.fill_between(rows[:, 0], rows[:, 2], rows[:, 3], color=colours[loss], alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Mean over runs per epoch; band: {band}")
    save_png(fig, path)


def plot_rank_blobs(
    losses: Sequence[str],
    frequencies: Mapping[str, np.ndarray],
    observed: Mapping[str, np.ndarray],
    path: Path,
    colours: Mapping[str, str] | None = None,
) -> None:
    """challengeR's blob plot (Wiesenfarth et al. 2021), one panel per ranking: for each loss (x, in
    the order of its observed rank) a disc at every rank it took in the bootstrap, its area the
    share of resamples; the observed rank as a black cross, the median and the 2.5-97.5 percentile
    range of the bootstrap ranks as a black dot and line.

    `frequencies`: panel title (the metric and ranking) -> [loss, rank - 1] shares; `observed`: panel
    title -> ranks.
    """
    plt = pyplot()
    colours = colours or run_colours(list(losses))
    n = len(losses)
    fig, axes = plt.subplots(
        1,
        len(frequencies),
        figsize=(max(4.0, 1.2 * n + 2) * len(frequencies), 3.8),
        squeeze=False,
        layout="constrained",
    )
    for ax, (title, freq) in zip(axes[0], frequencies.items(), strict=True):
        order = sorted(range(n), key=lambda i: (observed[title][i], i))
        for x, i in enumerate(order):
            shares = freq[i]
            ranks = np.arange(1, n + 1)
            ax.scatter(np.full(n, x), ranks, s=900 * shares, color=colours[losses[i]], alpha=0.8, linewidths=0)
            cumulative = np.cumsum(shares)
            lo, median, hi = (int(np.searchsorted(cumulative, q - 1e-12)) + 1 for q in (0.025, 0.5, 0.975))
            ax.plot([x, x], [lo, hi], color="black", linewidth=1)
            ax.plot([x], [median], "o", color="black", markersize=3)
            ax.plot([x], [observed[title][i]], "x", color="black", markersize=8)
        ax.set_xticks(range(n), [losses[i] for i in order], rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(1, n + 1))
        ax.set_ylim(n + 0.6, 0.4)
        ax.set_ylabel("rank (1 = best)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Ranking stability: bootstrap over patients and seeds (disc area = share of resamples; x observed rank)",
        fontsize=9,
    )
    save_png(fig, path)


def plot_significance_map(
    losses: Sequence[str],
    cells: Mapping[str, Mapping[tuple[int, int], tuple[float, float]]],
    path: Path,
    alpha: float,
    method: str,
) -> None:
    """challengeR's significance map, one panel per metric: cell (row a, column b) holds the mean
    difference a - b, signed so that positive means a is better, and its adjusted p (the test:
    `method`); coloured when the adjusted p < `alpha` (green: row better; red: row worse), grey otherwise.

    `cells`: metric title -> {(a, b): (a better by this much, adjusted p)} for every ordered pair.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    n = len(losses)
    fig, axes = plt.subplots(
        1,
        len(cells),
        figsize=(max(3.5, 1.0 * n + 1.5) * len(cells), max(3.2, 0.9 * n + 1.5)),
        squeeze=False,
        layout="constrained",
    )
    cmap = ListedColormap(["#d6604d", "#e0e0e0", "#4dac26"])
    for ax, (title, pairs) in zip(axes[0], cells.items(), strict=True):
        grid = np.zeros((n, n))
        for (a, b), (gain, p) in pairs.items():
            grid[a, b] = np.sign(gain) if p < alpha else 0
        ax.imshow(grid, cmap=cmap, vmin=-1, vmax=1)
        for (a, b), (gain, p) in pairs.items():
            ax.text(b, a, f"{gain:+.3g}\np={p:.2g}", ha="center", va="center", fontsize=7)
        for i in range(n):
            ax.text(i, i, "-", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(n), losses, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(n), losses, fontsize=8)
        ax.set_title(f"{title}: row better than column by", fontsize=9)
    fig.suptitle(f"{method[:1].upper()}{method[1:]} (coloured: p < {alpha})", fontsize=9)
    save_png(fig, path)


def plot_dot_box(
    losses: Sequence[str], values: Mapping[str, np.ndarray], path: Path, colours: Mapping[str, str] | None = None
) -> None:
    """challengeR's dot-and-box plot, one panel per metric: per loss a box of its per-patient values
    (quartiles, whiskers at 1.5 IQR) over the points of the patients; a patient's points are joined
    by a grey line across the losses. `values`: metric title -> [loss, patient]."""
    plt = pyplot()
    colours = colours or run_colours(list(losses))
    n = len(losses)
    fig, axes = plt.subplots(
        1, len(values), figsize=(max(4.0, 1.2 * n + 2) * len(values), 4.0), squeeze=False, layout="constrained"
    )
    for ax, (title, table) in zip(axes[0], values.items(), strict=True):
        x = np.arange(n)
        for patient in np.asarray(table).T:
            ax.plot(x, patient, color="0.6", linewidth=0.6, zorder=1)
        for i, loss in enumerate(losses):
            ax.scatter(np.full(table.shape[1], i), table[i], s=14, color=colours[loss], zorder=3)
        kept = [row[~np.isnan(row)] for row in table]
        ax.boxplot(
            kept,
            positions=x,
            widths=0.45,
            showfliers=False,
            zorder=2,
            medianprops={"color": "black"},
            boxprops={"facecolor": "none"},
            patch_artist=True,
        )
        ax.set_xticks(x, losses, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"per-patient {title} (mean over runs)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    save_png(fig, path)
