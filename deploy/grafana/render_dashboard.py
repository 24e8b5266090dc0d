"""Render the Grafana dashboard to a PNG from a Prometheus server's query results, without Grafana.

Runs every query of ``dashboards/anomaly-service.json`` over a time range against Prometheus's HTTP
API and draws each panel where the dashboard puts it (24-column grid): time series with the
dashboard's dashed reference lines, stats, the model table and the score heatmaps. Used for the
picture in deploy/README.md where Grafana itself cannot be installed; it shows the same queries
on the same data, not Grafana's exact styling.

    python deploy/grafana/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 30 --out deploy/dashboard.png

Needs matplotlib (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "anomaly-service.json"
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PALETTE = ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
UNIT_W, UNIT_H = 0.70, 0.34  # inches per grid column / row


@dataclass(frozen=True)
class Series:
    """One result series: its legend name and its (time, value) points."""

    name: str
    times: list[float]
    values: list[float]


class PrometheusAPI:
    """The few calls of Prometheus's HTTP API the renderer needs."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, str]) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self._get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get(
            "/api/v1/query", {"query": expr, "time": f"{at:.3f}"}
        )["result"]
        return result


def legend(template: str, labels: dict[str, str], fallback: str) -> str:
    if not template:
        return fallback or json.dumps(labels)
    return LEGEND.sub(lambda m: labels.get(m.group(1), ""), template)


def fmt(value: float, unit: str, decimals: int | None = None) -> str:
    if not math.isfinite(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.{2 if decimals is None else decimals}f}%"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.{1 if decimals is None else decimals}f}"


class Renderer:
    """Draws the dashboard's panels for one time range."""

    def __init__(
        self, api: PrometheusAPI, start: float, end: float, variables: dict[str, str]
    ) -> None:
        self.api = api
        self.start = start
        self.end = end
        self.step = max(1.0, (end - start) / 240)
        self.variables = variables

    def expr(self, text: str) -> str:
        return VARIABLE.sub(lambda m: self.variables[m.group(1) or m.group(2)], text)

    def series(self, target: dict[str, Any]) -> list[Series]:
        result = self.api.range(self.expr(target["expr"]), self.start, self.end, self.step)
        return [
            Series(
                legend(target.get("legendFormat", ""), item["metric"], target["refId"]),
                [float(t) for t, _ in item["values"]],
                [float(v) for _, v in item["values"]],
            )
            for item in result
        ]

    def timeseries(self, ax: Axes, panel: dict[str, Any]) -> None:
        config = panel["fieldConfig"]
        unit = config["defaults"].get("unit", "short")
        drawn = 0
        for target in panel["targets"]:
            for i, line in enumerate(self.series(target)):
                style: dict[str, Any] = {"linewidth": 1.6, "color": PALETTE[(drawn + i) % 8]}
                for override in config.get("overrides", []):
                    if not re.fullmatch(override["matcher"]["options"], line.name):
                        continue
                    for prop in override["properties"]:
                        if prop["id"] == "custom.lineStyle":
                            style["linestyle"] = (0, (5, 4))
                        elif prop["id"] == "color":
                            style["color"] = prop["value"]["fixedColor"].replace("red", "#d62728")
                        elif prop["id"] == "custom.lineWidth":
                            style["linewidth"] = prop["value"]
                times = [datetime.fromtimestamp(t, UTC) for t in line.times]
                ax.plot(times, line.values, label=line.name, **style)  # type: ignore[arg-type]
            drawn += 1
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(mticker.PercentFormatter(xmax=1.0))
        elif unit == "s":
            ax.yaxis.set_major_formatter(lambda v, _: f"{v * 1000:.0f} ms")
        ax.set_ylim(bottom=config["defaults"].get("min", None))
        self.time_axis(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.7)

    def time_axis(self, ax: Axes) -> None:
        """The dashboard's time range on the x axis, a few HH:MM ticks."""
        ends = [datetime.fromtimestamp(t, UTC) for t in (self.start, self.end)]
        ax.set_xlim(*mdates.date2num(ends))  # type: ignore[no-untyped-call]
        locator = mdates.AutoDateLocator(minticks=3, maxticks=7)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]

    def stat(self, ax: Axes, panel: dict[str, Any]) -> None:
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        decimals = panel["fieldConfig"]["defaults"].get("decimals")
        lines = []
        for target in panel["targets"]:
            for item in self.api.instant(self.expr(target["expr"]), self.end):
                name = legend(target.get("legendFormat", ""), item["metric"], "")
                lines.append((name, fmt(float(item["value"][1]), unit, decimals)))
        ax.axis("off")
        shown = lines or [("", "no data")]
        for column, (name, value) in enumerate(shown):
            x = (column + 0.5) / len(shown)
            ax.text(x, 0.55, value, ha="center", va="center", fontsize=20, weight="bold",
                    color="#1f77b4", transform=ax.transAxes)  # fmt: skip
            if name:
                ax.text(x, 0.12, name, ha="center", va="center", fontsize=8,
                        color="#555555", transform=ax.transAxes)  # fmt: skip

    def table(self, ax: Axes, panel: dict[str, Any]) -> None:
        (target,) = panel["targets"]
        organize = panel["transformations"][0]["options"]
        order = sorted(organize["indexByName"], key=organize["indexByName"].get)
        rename = organize.get("renameByName", {})
        rows = [
            [item["metric"].get(column, "") for column in order]
            for item in self.api.instant(self.expr(target["expr"]), self.end)
        ]
        ax.axis("off")
        if rows:
            labels = [rename.get(c, c) for c in order]
            widths = [max(len(str(v)) for v in [label, *column]) for label, *column in
                      zip(labels, *rows, strict=True)]  # fmt: skip
            table = ax.table(
                cellText=rows,
                colLabels=labels,
                colWidths=[w / sum(widths) for w in widths],
                loc="center",
            )
            table.auto_set_font_size(False)
            table.set_fontsize(7)
            table.scale(1, 1.4)

    def heatmap(self, ax: Axes, panel: dict[str, Any]) -> None:
        (target,) = panel["targets"]
        lines = [s for s in self.series(target) if s.name != "+Inf"]
        if not lines:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
            return
        lines.sort(key=lambda s: float(s.name))
        times = sorted({t for s in lines for t in s.times})
        index = {t: i for i, t in enumerate(times)}
        cumulative = np.zeros((len(lines), len(times)))
        for row, line in enumerate(lines):
            for t, v in zip(line.times, line.values, strict=True):
                cumulative[row, index[t]] = v
        counts = np.diff(cumulative, axis=0, prepend=0.0).clip(min=0)
        used = np.nonzero(counts.sum(axis=1) > 0)[0]
        low, high = (used[0], used[-1] + 1) if used.size else (0, len(lines))
        low, high = max(0, low - 1), min(len(lines), high + 1)  # a bucket of context each side
        counts = counts[low:high]
        x = mdates.date2num([datetime.fromtimestamp(t, UTC) for t in times])  # type: ignore[no-untyped-call]
        shade = np.sqrt(counts)
        ax.pcolormesh(x, np.arange(high - low), shade, cmap="Oranges", shading="nearest",
                      vmin=0.0, vmax=max(float(shade.max()), 1e-9))  # fmt: skip
        ticks = np.unique(np.linspace(0, high - low - 1, min(5, high - low)).round().astype(int))
        ax.set_yticks(ticks, [f"≤{float(lines[low + t].name):.3g}" for t in ticks], fontsize=7)
        self.time_axis(ax)

    def draw(self, panels: Sequence[dict[str, Any]], title: str) -> Figure:
        height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
        fig = plt.figure(figsize=(24 * UNIT_W, height * UNIT_H + 0.8))
        fig.suptitle(title, fontsize=13, x=0.01, ha="left", y=0.998)
        total_h = height * UNIT_H + 0.8
        for panel in panels:
            pos = panel["gridPos"]
            left = (pos["x"] + 0.25) / 24
            width = (pos["w"] - 0.5) / 24
            if panel["type"] == "row":
                fig.text(left, 1 - (0.5 + (pos["y"] + 0.8) * UNIT_H) / total_h, panel["title"],
                         fontsize=11, weight="bold", color="#333333")  # fmt: skip
                continue
            plain = panel["type"] in ("stat", "table")
            heading, under, ticks = (0.3, 0.05, 0.0) if plain else (0.4, 0.35, 0.55)
            top_in = 0.5 + pos["y"] * UNIT_H + heading
            bottom_in = 0.5 + (pos["y"] + pos["h"]) * UNIT_H - under
            ax = fig.add_axes(
                (
                    left + ticks / fig.get_figwidth(),
                    1 - bottom_in / total_h,
                    width - ticks / fig.get_figwidth(),
                    (bottom_in - top_in) / total_h,
                )
            )
            ax.set_title(panel["title"], fontsize=9, loc="left")
            ax.tick_params(labelsize=7)
            getattr(self, panel["type"])(ax, panel)
        return fig


def main(argv: Sequence[str] | None = None) -> int:
    """Render the dashboard for the last ``--minutes`` (or up to ``--end``) to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the time range")
    parser.add_argument("--end", type=float, default=None, help="end, Unix seconds (default now)")
    parser.add_argument("--job", default="anomaly-service")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args(argv)
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    end = args.end if args.end is not None else time.time()
    start = end - args.minutes * 60
    variables = {
        "job": args.job,
        "model_version": ".*",
        "__rate_interval": args.rate_interval,
        "__interval": "15s",
        "__range": f"{int(args.minutes)}m",
    }
    renderer = Renderer(PrometheusAPI(args.prometheus), start, end, variables)
    span = (
        f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M} to "
        f"{datetime.fromtimestamp(end, UTC):%H:%M} UTC"
    )
    figure = renderer.draw(
        board["panels"],
        f"{board['title']}: the dashboard's queries rendered from Prometheus ({span}), "
        "not a Grafana screenshot",
    )
    figure.savefig(args.out, dpi=72)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
