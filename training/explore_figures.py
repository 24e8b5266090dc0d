"""PNG figures of an exploration: the latent map, the separation of the defect classes,
interpolations, traversals, samples, and defective images beside their nearest normal images."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from training.evaluate import NORMAL
from training.explore import NEIGHBOURS, DefectCase, Exploration
from training.report import map_norm, to_display

F32Array = npt.NDArray[np.float32]

CELL = 1.15  # inches per image row
DPI = 100
GREY: dict[str, Any] = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
NORMAL_STYLE = {"color": "0.55", "marker": "o", "s": 14, "alpha": 0.6}
GOOD_STYLE = {"color": "tab:blue", "marker": "o", "s": 30, "alpha": 0.9}
DEFECT_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
DEFECT_MARKERS = ("^", "s", "D", "v", "P", "X", "*", "<", ">")


def _styles(exploration: Exploration) -> dict[str, dict[str, Any]]:
    """One colour and marker per folder label, shared by every figure; normal folders first."""
    styles = {exploration.normal.labels[0]: NORMAL_STYLE}
    if exploration.test is None:
        return styles
    good = f"test/{NORMAL}"
    if good in exploration.test.labels:
        styles[good] = GOOD_STYLE
    for i, label in enumerate(sorted(set(exploration.test.labels) - {good})):
        styles[label] = {
            "color": DEFECT_COLOURS[i % len(DEFECT_COLOURS)],
            "marker": DEFECT_MARKERS[i % len(DEFECT_MARKERS)],
            "s": 34,
            "alpha": 0.9,
        }
    return styles


def _image_grid(exploration: Exploration, rows: int, cols: int) -> tuple[Figure, Any]:
    spec = exploration.scorer.manifest.input
    width = CELL * spec.width / spec.height
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * width + 1.2, rows * CELL + 0.9), squeeze=False
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show(ax: Axes, image: F32Array) -> None:
    ax.imshow(to_display(image), **GREY)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def latent_map(path: Path, exploration: Exploration) -> Path:
    """Scatter of the posterior means, PCA and t-SNE side by side, coloured by folder."""
    ex = exploration
    labels = np.array(ex.normal.labels + (ex.test.labels if ex.test is not None else ()))
    panels = [("pca", ex.latent_map.pca)]
    if ex.latent_map.tsne is not None:
        panels.append(("tsne", ex.latent_map.tsne))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels) + 1.8, 5.4), squeeze=False)
    styles = _styles(ex)
    for ax, (name, coords) in zip(axes[0], panels, strict=True):
        for label, style in styles.items():
            keep = labels == label
            ax.scatter(coords[keep, 0], coords[keep, 1], label=f"{label} ({keep.sum()})", **style)
        if name == "pca":
            share = [f"{r:.0%}" for r in ex.pca.explained[:2]] + ["0%", "0%"]
            ax.set(
                xlabel=f"PC1 ({share[0]} of the normal latents' variance)",
                ylabel=f"PC2 ({share[1]})",
                title=f"PCA, directions fitted on {ex.normal.labels[0]}",
            )
        else:
            ax.set(
                xticks=[],
                yticks=[],
                title=f"t-SNE (perplexity {ex.latent_map.perplexity:.0f}, seed {ex.seed})",
            )
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    fig.suptitle(
        f"Posterior means of {len(labels)} images in the {ex.stats.latent_dim}-dimensional "
        "latent space, one point per image"
    )
    fig.tight_layout()
    return _save(fig, path)


def separation(path: Path, exploration: Exploration) -> Path | None:
    """Latent distance of every test image, one row per folder, with each class's AUROC."""
    ex = exploration
    if not ex.separation or ex.test is None or ex.test_distance is None:
        return None
    labels = np.array(ex.test.labels)
    rows = [f"test/{NORMAL}", *(f"test/{kind}" for kind in ex.separation)]
    styles = _styles(ex)
    fig, ax = plt.subplots(figsize=(8.0, 0.5 * len(rows) + 1.6))
    jitter = np.random.default_rng(0)
    good = ex.test_distance[labels == rows[0]]
    ax.axvspan(float(good.min()), float(good.max()), color="tab:blue", alpha=0.07)
    for y, label in enumerate(rows):
        values = ex.test_distance[labels == label]
        style = {k: v for k, v in styles[label].items() if k != "s"}
        ax.scatter(values, y + jitter.uniform(-0.2, 0.2, len(values)), s=26, **style)
        if label != rows[0]:
            s = ex.separation[label.removeprefix("test/")]
            ax.annotate(
                f"AUROC {s.auroc_distance:.2f}   (KL {s.auroc_kl:.2f})",
                xy=(1.01, y),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=9,
            )
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(
        f"latent distance: mean distance of the posterior mean to its {ex.distance_k} nearest "
        f"{ex.normal.labels[0]} posterior means"
    )
    ax.set_title(
        "How far each test image lies from the normal latents (shaded: the range of test/good)\n"
        "AUROC: this distance alone, test/good against the class; KL: the same for the KL score",
        fontsize=10,
    )
    return _save(fig, path)


def interpolations(path: Path, exploration: Exploration) -> Path | None:
    """One row per strip: the start input, the decoded points, the end input."""
    strips = exploration.strips
    if not strips:
        return None
    steps = len(strips[0].t)
    fig, axes = _image_grid(exploration, len(strips), steps + 2)
    for row, strip in enumerate(strips):
        _show(axes[row, 0], strip.start[2])
        for col, frame in enumerate(strip.frames, start=1):
            _show(axes[row, col], frame)
        _show(axes[row, -1], strip.end[2])
        start = f"{strip.start[0]}/{strip.start[1].name}"
        end = f"{strip.end[0]}/{strip.end[1].name}"
        axes[row, 0].set_ylabel(
            f"{strip.kind}\n{start}\n→ {end}", fontsize=7, rotation=0, ha="right", va="center"
        )
    titles = ["start input", *(f"t = {t:.3g}" for t in strips[0].t), "end input"]
    titles[1] += "\n(recon)"
    titles[-2] += "\n(recon)"
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        "Interpolations: decoded points evenly spaced on the line between two posterior means"
    )
    fig.tight_layout()
    return _save(fig, path)


def traversals(path: Path, exploration: Exploration) -> Path | None:
    """One row per principal direction: decoded steps from the mean, and where they differ."""
    rows = exploration.traversals
    if not rows:
        return None
    fig, axes = _image_grid(exploration, len(rows), len(rows[0].steps) + 1)
    changes = [np.abs(t.frames[-1] - t.frames[0]).mean(axis=0) for t in rows]
    vmax = max(float(c.max()) for c in changes) or 1.0
    for row, traversal in enumerate(rows):
        for col, frame in enumerate(traversal.frames):
            _show(axes[row, col], frame)
        axes[row, -1].imshow(changes[row], cmap="inferno", vmin=0.0, vmax=vmax)
        axes[row, 0].set_ylabel(
            f"PC{traversal.component + 1}\n{traversal.explained:.0%} of variance\n"
            f"σ = {traversal.sigma:.2g}",
            fontsize=8,
        )
    first, last = rows[0].steps[0], rows[0].steps[-1]
    titles = [("mean" if s == 0 else f"{s:+g}σ") for s in rows[0].steps]
    titles.append(f"change\n|{last:+g}σ − ({first:+g}σ)|")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        "Traversals: decoded steps from the mean of the normal latents along their top "
        "principal directions"
    )
    fig.tight_layout()
    return _save(fig, path)


def samples(path: Path, exploration: Exploration) -> Path:
    """Real normal inputs above decoded samples of the prior and of the normal latents."""
    drawn = exploration.samples
    rows: Sequence[tuple[str, F32Array]] = (
        (f"real images\n({exploration.normal.labels[0]})", drawn.real),
        ("decoded samples\nof the prior N(0, I)", drawn.prior),
        ("decoded samples of\nthe normal latents'\nGaussian", drawn.normal),
    )
    fig, axes = _image_grid(exploration, len(rows), max(len(images) for _, images in rows))
    for row, (title, images) in enumerate(rows):
        for col in range(axes.shape[1]):
            if col < len(images):
                _show(axes[row, col], images[col])
            else:
                axes[row, col].set_axis_off()
        axes[row, 0].set_ylabel(title, fontsize=8)
    fig.suptitle("Samples: new images generated by the decoder")
    fig.tight_layout()
    return _save(fig, path)


def _box(ax: Axes, mask: npt.NDArray[np.bool_] | None, margin: float = 2.5) -> None:
    """A box around the true defect that leaves the defect itself in view."""
    if mask is None or not mask.any():
        return
    rows, cols = np.nonzero(mask)
    corner = (cols.min() - margin, rows.min() - margin)
    width, height = cols.max() - cols.min() + 2 * margin, rows.max() - rows.min() + 2 * margin
    ax.add_patch(Rectangle(corner, width, height, fill=False, edgecolor="cyan", linewidth=0.8))


def _defect_rows(exploration: Exploration) -> dict[str, list[DefectCase]]:
    assert exploration.test is not None
    groups: dict[str, list[DefectCase]] = {}
    for case in exploration.defects:
        groups.setdefault(exploration.test.labels[case.index], []).append(case)
    return dict(sorted(groups.items()))


def defect_figures(out_dir: Path, exploration: Exploration) -> list[Path]:
    """Per defect class: input, reconstruction, anomaly map and the nearest normal images."""
    ex = exploration
    if not ex.defects or ex.test is None or ex.maps is None or ex.test_set is None:
        return []
    norm = map_norm(ex.maps)
    files = []
    for label, cases in _defect_rows(ex).items():
        fig, axes = _image_grid(ex, len(cases), 3 + NEIGHBOURS)
        for row, case in enumerate(cases):
            i = case.index
            _show(axes[row, 0], ex.test.images[i])
            _box(axes[row, 0], ex.test_set.masks[i])
            _show(axes[row, 1], ex.test.recon[i])
            axes[row, 2].imshow(ex.maps[i], cmap="inferno", norm=norm)
            distance = ex.test_distance[i] if ex.test_distance is not None else float("nan")
            axes[row, 0].set_ylabel(f"{ex.test.paths[i].name}\nd {distance:.3g}", fontsize=8)
            for col, (n, d) in enumerate(zip(case.neighbours, case.distances, strict=True), 3):
                _show(axes[row, col], ex.normal.images[n])
                axes[row, col].set_xlabel(f"{ex.normal.paths[n].name}  d {d:.3g}", fontsize=7)
        titles = ["input", "reconstruction", "anomaly map"]
        titles += [f"nearest normal {k + 1}" for k in range(NEIGHBOURS)]
        for ax, title in zip(axes[0], titles, strict=True):
            ax.set_title(title, fontsize=8)
        fig.suptitle(
            f"{label}: what should this part have looked like?\n"
            f"Its nearest {ex.normal.labels[0]} images in latent space (d: latent distance; "
            "cyan: box around the ground-truth defect)",
            fontsize=10,
        )
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.removeprefix("test/"))
        files.append(_save(fig, out_dir / f"defects_{name}.png"))
    return files
