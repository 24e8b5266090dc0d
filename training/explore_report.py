"""The explore report: ``index.html`` with PNG figures, and ``explore.json`` with their numbers."""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime import DevicePolicy
from training import explore_figures as figures
from training.errors import TrainingError
from training.explore import ACTIVE_VARIANCE, DISTANCE_SCORE, Encoded, Exploration, explore

log = logging.getLogger(__name__)

INDEX = "index.html"
JSON = "explore.json"


def _r(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _r(v) if isinstance(v, float) else v for k, v in values.items()}


def _file(images: Encoded, index: int) -> dict[str, str]:
    return {"file": str(images.paths[index]), "label": images.labels[index]}


def _map_points(ex: Exploration) -> list[dict[str, Any]]:
    rows = [(ex.normal, i) for i in range(len(ex.normal.paths))]
    if ex.test is not None:
        rows += [(ex.test, i) for i in range(len(ex.test.paths))]
    tsne = ex.latent_map.tsne
    return [
        {
            **_file(images, i),
            "pca": [_r(v, 3) for v in ex.latent_map.pca[n]],
            "tsne": None if tsne is None else [_r(v, 3) for v in tsne[n]],
        }
        for n, (images, i) in enumerate(rows)
    ]


def _separation(ex: Exploration) -> dict[str, Any]:
    result: dict[str, Any] = {
        "score": DISTANCE_SCORE.format(k=ex.distance_k),
        "k": ex.distance_k,
        "auroc": "AUROC of the score alone, test/good (negative) against the class (positive); "
        "auroc_kl: the same for the KL score of the product",
        "classes": {kind: _rounded(asdict(s)) for kind, s in ex.separation.items()},
    }
    if ex.test is not None and ex.test_distance is not None:
        result["test_images"] = [
            {**_file(ex.test, i), "distance": _r(d)} for i, d in enumerate(ex.test_distance)
        ]
    return result


def _defects(ex: Exploration) -> list[dict[str, Any]]:
    if ex.test is None:
        return []
    return [
        {
            **_file(ex.test, case.index),
            "distance": None if ex.test_distance is None else _r(ex.test_distance[case.index]),
            "neighbours": [
                {"file": str(ex.normal.paths[n]), "distance": _r(d)}
                for n, d in zip(case.neighbours, case.distances, strict=True)
            ],
        }
        for case in ex.defects
    ]


def summary(ex: Exploration, figure_names: list[str]) -> dict[str, Any]:
    """The numbers behind the figures, JSON-ready."""
    manifest = ex.scorer.manifest
    test_counts = None
    if ex.test_set is not None:
        kinds = ex.test_set.kinds
        test_counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": {
            "path": str(ex.scorer.bundle.path),
            "model_id": manifest.model_id,
            "model_version": manifest.model_version,
            "input": manifest.input.to_dict(),
            "latent_dim": manifest.latent_dim,
            "provider": ex.scorer.provider,
        },
        "data": {
            "folder": str(ex.data_dir),
            "normal": {"label": ex.normal.labels[0], "n": len(ex.normal.paths)},
            "test": test_counts,
        },
        "seed": ex.seed,
        "skipped": [{"what": what, "why": why} for what, why in ex.skipped],
        "latent": {
            **_rounded(asdict(ex.stats)),
            "active_dims_rule": f"variance of the posterior mean across the normal images "
            f"> {ACTIVE_VARIANCE}",
        },
        "pca": {
            "fitted_on": ex.normal.labels[0],
            "explained_variance_ratio": [_r(v) for v in ex.pca.explained[:10]],
            "sigma": [_r(v) for v in ex.pca.sigma[:10]],
        },
        "map": {
            "points": _map_points(ex),
            "tsne": None
            if ex.latent_map.perplexity is None
            else {
                "perplexity": _r(ex.latent_map.perplexity, 2),
                "method": ex.latent_map.method,
                "seed": ex.seed,
            },
        },
        "separation": _separation(ex) if ex.separation else None,
        "interpolations": [
            {
                "kind": s.kind,
                "from": str(s.start[1]),
                "to": str(s.end[1]),
                "t": [_r(t) for t in s.t],
            }
            for s in ex.strips
        ],
        "traversals": [
            {
                "component": t.component + 1,
                "explained_variance_ratio": _r(t.explained),
                "sigma": _r(t.sigma),
                "steps_in_sigma": list(t.steps),
                "mean_abs_change": _r(np.abs(t.frames[-1] - t.frames[0]).mean()),
            }
            for t in ex.traversals
        ],
        "samples": {
            "n": len(ex.samples.prior),
            "prior": "z ~ N(0, I), decoded",
            "normal": "z ~ the Gaussian with the mean and covariance of the normal posterior "
            "means, decoded",
            "seed": ex.seed,
        },
        "defects": _defects(ex),
        "figures": figure_names,
    }


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}
.skipped{background:#fff6e0;padding:.5em 1em;border-left:4px solid #e0a000}"""


def _html(ex: Exploration, data: dict[str, Any], names: set[str]) -> str:
    b, d, lat = data["bundle"], data["data"], data["latent"]
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Latent space of "
        f"{e(b['model_id'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Latent space of model {e(b['model_id'])} (version {e(b['model_version'])})</h1>",
        f"<p>Bundle <code>{e(b['path'])}</code>: input {b['input']['height']}×"
        f"{b['input']['width']} {e(b['input']['color_mode'])}, latent size {b['latent_dim']}, "
        f"run under ONNX Runtime on {e(b['provider'])}. Data <code>{e(d['folder'])}</code>: "
        f"{d['normal']['n']} images in {e(d['normal']['label'])}"
        + (", test: " + ", ".join(f"{e(k)} {n}" for k, n in d["test"].items()) if d["test"] else "")
        + f". Seed {ex.seed}; numbers in <a href='{JSON}'>{JSON}</a>.</p>",
        f"<p>Normal latents: {lat['active_dims']} of {lat['latent_dim']} dimensions active "
        f"(their posterior mean varies, variance &gt; {ACTIVE_VARIANCE}); mean KL to the prior "
        f"{lat['mean_kl']:.4g} nats; posterior std {lat['mean_posterior_std']:.3g} against a "
        f"spread of the means of {lat['mean_spread']:.3g} (both averaged over dimensions).</p>",
    ]
    if ex.skipped:
        items = "".join(f"<li>{e(what)}: {e(why)}</li>" for what, why in ex.skipped)
        parts.append(f"<div class='skipped'><b>Not shown</b><ul>{items}</ul></div>")
    tsne = (
        "; right: t-SNE of all means (neighbourhoods are meaningful, distances between clusters "
        "are not)"
        if ex.latent_map.tsne is not None
        else ""
    )
    parts += [
        "<h2>Map of the latent space</h2>",
        "<p>Each point is one image's posterior mean (the encoder's <code>mu</code>). Left: "
        f"the plane of the two principal directions of the normal images' means{tsne}.</p>",
        _img("map.png", "latent map"),
    ]
    if "separation.png" in names and ex.separation:
        rows = [
            [
                kind,
                str(s.n),
                f"{s.auroc_distance:.3f}",
                f"{s.auroc_kl:.3f}",
                f"{s.median_distance:.3g}",
            ]
            for kind, s in ex.separation.items()
        ]
        parts += [
            "<h2>Separation of each defect class in the latent space</h2>",
            f"<p>Score: the {e(DISTANCE_SCORE.format(k=ex.distance_k))}. AUROC of this score "
            "alone, test/good against the class: 1 means every defective image lies further "
            "from the normal latents than every good one, 0.5 no separation. The KL column is "
            "the same for the product's KL score. A model trained to repair "
            "defects (denoising) maps a defective part close to the normal part under it, so low "
            "values there are expected: its reconstruction error does the detecting.</p>",
            _table(
                ["class", "images", "AUROC latent distance", "AUROC KL", "median distance"], rows
            ),
            _img("separation.png", "separation"),
        ]
    if "interpolations.png" in names:
        parts += [
            "<h2>Interpolations</h2>",
            "<p>Decoded points evenly spaced on the straight line between two posterior means; the "
            "ends are the reconstructions of the two inputs shown beside them. Good to good: the "
            "normal images at both ends of the first two principal directions. Good to defective: "
            "for each defect class, its image furthest from the normal latents, from its nearest "
            "normal image.</p>",
            _img("interpolations.png", "interpolations"),
        ]
    if "traversals.png" in names:
        parts += [
            "<h2>Traversals</h2>",
            "<p>Decoded steps from the mean of the normal latents along each of their top "
            "principal directions, in units of the normal images' standard deviation σ along "
            "it; the last column shows where the two extremes differ.</p>",
            _img("traversals.png", "traversals"),
        ]
    parts += [
        "<h2>Samples</h2>",
        "<p>Real normal images, then decoded draws from the prior N(0, I) and from the "
        "Gaussian with the mean and covariance of the normal posterior means.</p>",
        _img("samples.png", "samples"),
    ]
    defect_figures = sorted(n for n in names if n.startswith("defects_"))
    if defect_figures:
        parts += [
            "<h2>Defective images and their nearest normal images</h2>",
            "<p>For each defective test image: the input (cyan: a box around the ground-truth "
            "defect where a mask is known), its reconstruction, the anomaly map "
            "(squared error, one colour scale for all), and the normal training images whose "
            "posterior means are nearest to its own: what this part should have looked like.</p>",
            *(_img(name, name) for name in defect_figures),
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: Path, ex: Exploration) -> list[Path]:
    """Write the figures, ``explore.json`` and ``index.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [
        figures.latent_map(out_dir / "map.png", ex),
        figures.separation(out_dir / "separation.png", ex),
        figures.interpolations(out_dir / "interpolations.png", ex),
        figures.traversals(out_dir / "traversals.png", ex),
        figures.samples(out_dir / "samples.png", ex),
        *figures.defect_figures(out_dir, ex),
    ]
    files = [f for f in drawn if f is not None]
    names = [f.name for f in files]
    data = summary(ex, names)
    (out_dir / JSON).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out_dir / INDEX).write_text(_html(ex, data, set(names)), encoding="utf-8")
    return [*files, out_dir / JSON, out_dir / INDEX]


def run_explore(
    bundle_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    device: DevicePolicy = "auto",
    seed: int = 0,
    skip_bad: bool = False,
) -> Path:
    """Explore the bundle on the data and write the report; returns ``out_dir/index.html``."""
    started = time.monotonic()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise TrainingError(f"output {out_dir} exists and is not a folder")
    exploration = explore(bundle_dir, data_dir, device=device, seed=seed, skip_bad=skip_bad)
    for what, why in exploration.skipped:
        log.info("not shown: %s (%s)", what, why)
    log.info("drawing the figures")
    files = write_report(Path(out_dir), exploration)
    log.info(
        "wrote %s (%d files) in %.0f s", out_dir / INDEX, len(files), time.monotonic() - started
    )
    return Path(out_dir) / INDEX
