"""One output row per image for the client CLI, written as CSV or JSON Lines."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from service.client.client import Result
from service.score_names import SCORE_NAMES

SCORE_FIELDS = (
    *SCORE_NAMES,
    "combined",
    *(f"{name}_p_value" for name in SCORE_NAMES),
    "combined_p_value",
    "threshold",
)
FIELDS = ("path", "id", "model_id", *SCORE_FIELDS, "is_anomaly", "error")


def result_row(path: str, result: Result) -> dict[str, Any]:
    """The row of a scored (or failed) image."""
    row: dict[str, Any] = {"path": path, "id": result.id, "model_id": result.model_id}
    scores = result.scores
    for name in SCORE_FIELDS:
        row[name] = getattr(scores, name) if scores is not None else None
    row["is_anomaly"] = scores.is_anomaly if scores is not None else None
    code = result.error_code
    row["error"] = f"{code.name}: {result.error.message}" if code and result.error else None
    return row


def failure_row(path: str, image_id: str, error: str) -> dict[str, Any]:
    """The row of an image that never reached the server or whose call failed."""
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(path=path, id=image_id, error=error)
    return row


class RowWriter:
    """Writes rows to ``FILE.csv``, ``FILE.jsonl`` (``.json``), or JSON Lines on stdout (``-``)."""

    def __init__(self, target: str) -> None:
        suffix = Path(target).suffix.lower()
        if target != "-" and suffix not in (".csv", ".jsonl", ".json"):
            raise ValueError(f"output {target!r} should end in .csv or .jsonl (or be '-')")
        self.to_stdout = target == "-"
        self._file: IO[str] = (
            sys.stdout if self.to_stdout else Path(target).open("w", encoding="utf-8", newline="")  # noqa: SIM115 (closed in close())
        )
        self._csv = csv.DictWriter(self._file, FIELDS) if suffix == ".csv" else None
        if self._csv is not None:
            self._csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        """Write one row."""
        if self._csv is not None:
            self._csv.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        """Flush, and close the file (not stdout)."""
        self._file.flush()
        if not self.to_stdout:
            self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
