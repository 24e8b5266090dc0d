"""Calibration on held-out normal images and the choice of the decision rule.

The scores come from ONNX Runtime outputs through ``service.scoring.raw_scores``, so the stored
calibration is computed exactly as the service computes scores. When the local window or the
weights of the combined score are not given, they are chosen from small fixed candidate sets by
how well they separate held-out normal images from synthetic defects drawn into those same
images (:mod:`training.synth`); real defects and test images are never used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.runtime import OnnxGraphs
from service.scoring import Calibration, LatentReference, raw_scores
from training.metrics import auroc
from training.synth import synthesise_anomalies

F32Array = npt.NDArray[np.float32]

# Candidate local windows as fractions of the shorter image side: specks to blotches.
WINDOW_DIVISORS = (32, 16, 8)
WEIGHT_CANDIDATES: tuple[Mapping[str, float], ...] = (
    {"defect_probability": 1.0},
    {"defect_probability": 1.0, "local_error": 1.0},
    {"defect_probability": 1.0, "latent_distance": 1.0},
    {"defect_probability": 1.0, "local_error": 1.0, "latent_distance": 1.0},
    {"local_error": 1.0},
    {"local_error": 1.0, "latent_distance": 1.0},
)
SYNTHETIC_COPIES = 4


@dataclass(frozen=True)
class RuleChoice:
    """The chosen window and weights, and the synthetic-defect AUROC of every candidate."""

    local_window: int
    weights: Mapping[str, float]
    synthetic_auroc: float
    method: str
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest's training section."""
        return {
            "local_window": self.local_window,
            "weights": dict(self.weights),
            "synthetic_auroc": self.synthetic_auroc,
            "method": self.method,
            "candidates": self.candidates,
        }


def window_candidates(height: int, width: int) -> list[int]:
    """Local windows tried when none is given: the shorter side over each of WINDOW_DIVISORS."""
    side = min(height, width)
    return sorted({max(2, side // d) for d in WINDOW_DIVISORS})


def choose_rule(
    graphs: OnnxGraphs,
    reference: LatentReference,
    normal: F32Array,
    *,
    seed: int,
    local_window: int | None,
    weights: Mapping[str, float] | None,
) -> RuleChoice:
    """Pick window and weights maximising normal-vs-synthetic AUROC; given ones are kept."""
    _, _, height, width = normal.shape
    windows = [local_window] if local_window is not None else window_candidates(height, width)
    weightings = [weights] if weights is not None else list(WEIGHT_CANDIDATES)
    if len(windows) == 1 and len(weightings) == 1:
        return RuleChoice(windows[0], dict(weightings[0]), float("nan"), "given by the user")
    synthetic = synthesise_anomalies(normal, copies=SYNTHETIC_COPIES, seed=seed)
    labels = np.r_[np.zeros(normal.shape[0]), np.ones(synthetic.shape[0])]
    normal_out = graphs.run_in_batches(normal)
    synthetic_out = graphs.run_in_batches(synthetic)
    table: list[dict[str, Any]] = []
    best: tuple[float, int, Mapping[str, float]] | None = None
    for window in windows:
        normal_raw, _ = raw_scores(normal, normal_out, window, reference)
        synthetic_raw, _ = raw_scores(synthetic, synthetic_out, window, reference)
        for weighting in weightings:
            calibration = Calibration.fit(
                normal_raw, weighting, target_false_alarm_rate=0.5, local_window=window
            )
            combined = np.r_[calibration.combine(normal_raw), calibration.combine(synthetic_raw)]
            score = auroc(combined, labels)
            table.append({"local_window": window, "weights": dict(weighting), "auroc": score})
            # Strictly better only: ties keep the earlier, simpler candidate.
            if best is None or score > best[0] + 1e-9:
                best = (score, window, weighting)
    assert best is not None
    method = (
        f"highest AUROC of held-out normal images against {synthetic.shape[0]} synthetic "
        "defects of kinds never trained on (pasted patches, blotches, noise, relighting) "
        "drawn into them"
    )
    return RuleChoice(best[1], dict(best[2]), best[0], method, table)


def calibrate(
    graphs: OnnxGraphs,
    reference: LatentReference,
    normal: F32Array,
    choice: RuleChoice,
    *,
    target_false_alarm_rate: float,
) -> Calibration:
    """Fit the calibration of every score and the default threshold on held-out normals."""
    raw, _ = raw_scores(normal, graphs.run_in_batches(normal), choice.local_window, reference)
    return Calibration.fit(
        raw,
        choice.weights,
        target_false_alarm_rate=target_false_alarm_rate,
        local_window=choice.local_window,
    )
