"""``evaluate``: score ``DATA_DIR/test/*`` through ONNX Runtime exactly as the service does.

Labels come from folder names (``good`` is normal, any other folder anomalous); pixel masks from
``DATA_DIR/ground_truth/<folder>/`` where they exist, named as MVTec AD names them
(``<name>_mask.png``) or as the image itself (``<name>.png``; any image format).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy.stats import mannwhitneyu

from service.preprocessing import (
    ImageError,
    InputSpec,
    list_image_files,
    load_image_file,
    stack,
)
from service.runtime import DevicePolicy, Scorer, open_scorer
from service.scoring import SCORE_NAMES, F64Array, batch_slices
from training.copies import near_copies_of, thumbnails
from training.data import ImageSet, find_images, load_samples
from training.errors import DataError
from training.metrics import auroc, average_precision, best_tpr_at_fpr, threshold_stats

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]
NORMAL = "good"
# The key of each score's image AUROC in the metrics (auroc_latent: the latent-only score).
AUROC_KEYS: dict[str, str] = {
    "recon_error": "auroc_recon",
    "kl": "auroc_kl",
    "local_error": "auroc_local",
    "latent_distance": "auroc_latent",
    "defect_probability": "auroc_defect",
    "coarse_error": "auroc_coarse",
}
# The names a defective image's mask may have in ground_truth/<folder>/, in the order they are
# looked for (without the suffix: any of the image formats the service reads).
MASK_STEMS = ("{stem}_mask", "{stem}")
# False-alarm budgets at which evaluate reports the best TPR any threshold on the test set reaches.
FPR_BUDGETS = (0.01, 0.03, 0.05)
# Below this two-sided p-value (Mann-Whitney) the test split's good images are said to score
# unlike the held-out good images the threshold was set on.
SHIFT_P_VALUE = 1e-3


# Upper edges of the defect-area classes of ``caught_by_defect_area``: the mask's share of the
# frame at the model input, each four times the last (at 256x256: 66, 262, 1,049 and 4,194
# pixels); the last class is open above.
DEFECT_AREA_EDGES = (0.001, 0.004, 0.016, 0.064)


# evaluate's figures of the test split against the fit's held-out good images.
HELD_OUT_KEYS = ("n_held_out_good", "auroc_defects_vs_held_out", "auroc_test_good_vs_held_out")


def defect_area_classes() -> list[tuple[float, float | None]]:
    """The ``(from, to)`` shares of the frame of each defect-area class; ``to`` is None for the
    last, open class."""
    lows = (0.0, *DEFECT_AREA_EDGES)
    highs: tuple[float | None, ...] = (*DEFECT_AREA_EDGES, None)
    return list(zip(lows, highs, strict=True))


def defect_area_key(low: float, high: float | None) -> str:
    """The key of a defect-area class, in percent of the frame: ``"0.1-0.4%"``, ``">=6.4%"``."""
    if high is None:
        return f">={100 * low:g}%"
    return f"<{100 * high:g}%" if low == 0.0 else f"{100 * low:g}-{100 * high:g}%"


def defect_area_keys() -> tuple[str, ...]:
    """The keys of ``caught_by_defect_area``, smallest class first."""
    return tuple(defect_area_key(low, high) for low, high in defect_area_classes())


def caught_by_defect_area(
    masks: tuple[npt.NDArray[np.bool_] | None, ...],
    labels: npt.NDArray[np.bool_],
    flagged: npt.NDArray[np.bool_],
) -> dict[str, dict[str, float | int | None]] | None:
    """For the defective images with a mask, per class of defect area (the mask's share of the
    frame, :func:`defect_area_classes`): how many there are and the share of them ``flagged``
    (None where a class has none). None when no defective image has a mask. Small defects are
    the first that a coarser input misses: this says at which size the catch is lost."""
    share_of = {i: float(m.mean()) for i, m in enumerate(masks) if labels[i] and m is not None}
    if not share_of:
        return None
    shares = np.array(list(share_of.values()))
    caught = np.asarray(flagged, dtype=bool)[list(share_of)]
    result: dict[str, dict[str, float | int | None]] = {}
    for low, high in defect_area_classes():
        inside = (shares >= low) & (shares < (np.inf if high is None else high))
        n = int(inside.sum())
        result[defect_area_key(low, high)] = {
            "defects": n,
            "caught": float(caught[inside].mean()) if n else None,
        }
    return result


def budget_key(rate: float) -> str:
    """The key of ``best_tpr_at_fpr`` for a false-alarm budget: ``0.03 -> "0.03"``."""
    return f"{rate:g}"


@dataclass(frozen=True)
class TestSet:
    """Preprocessed test images with labels, defect types and (where known) pixel masks."""

    paths: tuple[Path, ...]
    kinds: tuple[str, ...]
    images: F32Array  # (N, C, H, W)
    masks: tuple[npt.NDArray[np.bool_] | None, ...]  # (H, W) each; all-False for normal images

    @property
    def labels(self) -> npt.NDArray[np.bool_]:
        """True for anomalous images."""
        return np.array([kind != NORMAL for kind in self.kinds])


@dataclass(frozen=True)
class Evaluation:
    """Everything evaluate computed: the test set, every score, verdicts and anomaly maps."""

    test: TestSet
    scores: dict[str, F64Array]  # raw scores and "combined"
    is_anomaly: npt.NDArray[np.bool_]
    threshold: float
    maps: F32Array  # (N, H, W)
    metrics: dict[str, Any]


def _load_mask(path: Path, spec: InputSpec) -> npt.NDArray[np.bool_]:
    try:
        with Image.open(path) as mask:
            resized = mask.convert("L").resize((spec.width, spec.height), Image.Resampling.NEAREST)
            return np.asarray(resized) > 127
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc


def _mask_index(folder: Path) -> dict[str, Path]:
    """The image files of a ground-truth folder by name without suffix; raises where two files
    differ only in their suffix (which of them is the mask?)."""
    index: dict[str, Path] = {}
    for path in list_image_files(folder) if folder.is_dir() else []:
        if path.stem in index:
            raise DataError(
                f"{folder} holds two masks named {path.stem}: {index[path.stem].name}, "
                f"{path.name}; keep one"
            )
        index[path.stem] = path
    return index


def _find_mask(index: dict[str, Path], stem: str) -> Path | None:
    return next(
        (index[name] for name in (p.format(stem=stem) for p in MASK_STEMS) if name in index), None
    )


def _log_missing_masks(
    data_dir: Path, labels: list[str], masks: list[npt.NDArray[np.bool_] | None]
) -> None:
    """Say where some defective images have a mask and others none: the pixel AUROC is then
    computed on the masked ones only."""
    missing = [
        label for label, mask in zip(labels, masks, strict=True) if label != NORMAL and mask is None
    ]
    defective = sum(label != NORMAL for label in labels)
    if missing and (Path(data_dir) / "ground_truth").is_dir():
        log.warning(
            "%d of %d defective test images have no mask in %s/<folder>/ (looked for "
            "<name>_mask.<ext> and <name>.<ext>; %s): the pixel AUROC %s",
            len(missing), defective, Path(data_dir) / "ground_truth",
            ", ".join(f"{k}: {missing.count(k)}" for k in sorted(set(missing))),
            "reads the others only" if len(missing) < defective else "is not computed",
        )  # fmt: skip


def load_test_set(data_dir: Path, spec: InputSpec, *, need_both: bool = True) -> TestSet:
    """Every image under ``DATA_DIR/test/<kind>/``, preprocessed with the bundle's spec.

    With ``need_both`` (evaluation), normal and anomalous images must both be present;
    otherwise any non-empty set will do.
    """
    test_dir = Path(data_dir) / "test"
    if not test_dir.is_dir():
        raise DataError(
            f"{data_dir} has no test folder; expected {test_dir}/good and {test_dir}/<defect type>"
        )
    kinds = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[str] = []
    for kind in kinds:
        files = list_image_files(test_dir / kind)
        paths += files
        labels += [kind] * len(files)
    if not labels:
        raise DataError(f"{test_dir} holds no images in its subfolders")
    n_normal = labels.count(NORMAL)
    if need_both and n_normal in (0, len(labels)):
        raise DataError(
            f"{test_dir} holds {n_normal} normal images (in good/) and "
            f"{len(labels) - n_normal} anomalous ones; evaluation needs both"
        )
    images: list[F32Array] = []
    masks: list[npt.NDArray[np.bool_] | None] = []
    mask_files = {
        kind: _mask_index(Path(data_dir) / "ground_truth" / kind) for kind in set(labels) - {NORMAL}
    }
    for path, kind in zip(paths, labels, strict=True):
        try:
            images.append(load_image_file(path, spec))
        except ImageError as exc:
            raise DataError(f"cannot use test image {path}: {exc}") from exc
        if kind == NORMAL:
            masks.append(np.zeros((spec.height, spec.width), dtype=bool))
            continue
        mask_path = _find_mask(mask_files[kind], path.stem)
        masks.append(_load_mask(mask_path, spec) if mask_path is not None else None)
    _log_missing_masks(Path(data_dir), labels, masks)
    return TestSet(tuple(paths), tuple(labels), stack(images), tuple(masks))


def load_training_folder(data_dir: Path, spec: InputSpec) -> ImageSet[np.uint8] | None:
    """The 8-bit samples of ``DATA_DIR/train/good`` in the bundle's input spec (unreadable files
    skipped); ``None`` where there is no such folder."""
    folder = Path(data_dir) / "train" / "good"
    if not folder.is_dir():
        return None
    return load_samples(find_images(folder), spec, skip_bad=True)


def copies_of_training(
    training: ImageSet[np.uint8], spec: InputSpec, test: TestSet
) -> list[tuple[Path, Path]]:
    """Test images that are copies or near-copies of a training image
    (:func:`training.copies.near_copies_of`), each with the training image nearest to it. Their
    scores read like a training image's, so figures with them are optimistic."""
    reference = thumbnails(training.images) * spec.scale
    found = near_copies_of(reference, thumbnails(test.images))
    return [(test.paths[i], training.paths[j]) for i, j in found]


def fitted_on(training: ImageSet[np.uint8], facts: Mapping[str, Any]) -> bool:
    """Whether ``training`` is the folder the bundle was fitted on (its manifest's training
    facts hold the fingerprint of that folder's files); the reason is logged where it is not,
    or where the bundle does not say."""
    fingerprint = (facts.get("data") or {}).get("fingerprint")
    if not fingerprint:
        log.info(
            "the bundle does not record its training folder: its held-out images are not compared"
        )
        return False
    if fingerprint != training.fingerprint:
        log.info(
            "train/good is not the folder this bundle was fitted on (fingerprint %s, the fit's "
            "%s): its held-out images are not compared",
            training.fingerprint, fingerprint,
        )  # fmt: skip
        return False
    return True


@dataclass(frozen=True)
class ScoreShift:
    """How one set of combined scores sits against another: the AUROC of the first against the
    second (0.5: alike) and the two-sided Mann-Whitney p-value of a difference."""

    auroc: float
    p_value: float


def score_shift(scores: F64Array, reference: F64Array) -> ScoreShift:
    """:class:`ScoreShift` of ``scores`` against ``reference`` (ties count a half)."""
    labels = np.r_[np.ones(scores.size, dtype=bool), np.zeros(reference.size, dtype=bool)]
    area = auroc(np.r_[scores, reference], labels)
    if np.ptp(np.r_[scores, reference]) == 0.0:
        return ScoreShift(area, 1.0)  # all equal: nothing to tell apart
    test = mannwhitneyu(scores, reference, alternative="two-sided", method="asymptotic")
    return ScoreShift(area, float(test.pvalue))


def shift_warning(shift: ScoreShift) -> str | None:
    """A warning where the test split's good images score unlike the held-out good images
    (p below ``SHIFT_P_VALUE``); ``None`` where they score alike."""
    if shift.p_value >= SHIFT_P_VALUE:
        return None
    side = "higher" if shift.auroc > 0.5 else "lower"
    return (
        f"the test split's good images score {side} than the held-out good images the threshold "
        f"was set on (AUROC {shift.auroc:.2f} against them, p = {shift.p_value:.1g}): they are "
        "not like the good images the model was fitted on (light, camera, parts), so the false "
        "alarms and the catch at the threshold on this test split are not what a line that "
        "looks like the training images gets; auroc_defects_vs_held_out reads the defects "
        "against good images like the training ones"
    )


def _against_held_out(
    scorer: Scorer,
    training: ImageSet[np.uint8] | None,
    combined: F64Array,
    labels: npt.NDArray[np.bool_],
) -> dict[str, Any]:
    """The count of the good images the threshold was set on, and the AUROC of the test defects
    and of the test split's good images against them (None unless ``training`` is the folder
    the bundle was fitted on). Their combined scores are the ones the calibration keeps: the
    fit's held-out images, or a recalibration's (``service.recalibrate``)."""
    if training is None or not fitted_on(training, scorer.manifest.training):
        return dict.fromkeys(HELD_OUT_KEYS)
    held_out = np.asarray(scorer.calibration.combined.values, dtype=np.float64)
    good = score_shift(combined[~labels], held_out)
    warning = shift_warning(good)
    if warning is not None:
        log.warning("%s", warning)
    return {
        "n_held_out_good": int(held_out.size),
        "auroc_defects_vs_held_out": score_shift(combined[labels], held_out).auroc,
        "auroc_test_good_vs_held_out": good.auroc,
    }


def _log_copies_of_training(data_dir: Path, copies: list[tuple[Path, Path]]) -> None:
    if copies:
        log.warning(
            "%d test images are copies or near-copies of training images (e.g. %s of %s): "
            "they score like images the model trained on, so the figures are optimistic",
            len(copies), copies[0][0].relative_to(data_dir), copies[0][1].relative_to(data_dir),
        )  # fmt: skip


def _pixel_auroc(test: TestSet, maps: F32Array) -> float | None:
    known = [i for i, m in enumerate(test.masks) if m is not None]
    if not any(test.labels[i] for i in known):
        return None
    truth = np.stack([m for m in test.masks if m is not None])
    if not truth.any():
        return None
    return auroc(maps[known].ravel(), truth.ravel())


def _auroc_by_type(test: TestSet, combined: F64Array) -> dict[str, float]:
    """AUROC of normal images against each defect type alone."""
    kinds = np.array(test.kinds)
    result: dict[str, float] = {}
    for kind in sorted(set(test.kinds) - {NORMAL}):
        keep = (kinds == NORMAL) | (kinds == kind)
        result[kind] = auroc(combined[keep], kinds[keep] == kind)
    return result


def _verdicts_at_rate(
    scorer: Scorer, combined: F64Array, labels: npt.NDArray[np.bool_], rate: float
) -> dict[str, float]:
    """The threshold the service sets for a request asking false-alarm rate ``rate`` (from the
    held-out good images alone), and the TPR and FPR of its verdicts on the test set."""
    threshold = scorer.calibration.rule_for(target_false_alarm_rate=rate).threshold
    stats = threshold_stats(combined >= threshold, labels)
    return {"threshold": threshold, "tpr": stats.tpr, "fpr": stats.fpr}


def run_evaluation(
    bundle_dir: Path, data_dir: Path, *, device: DevicePolicy = "auto", batch_size: int = 32
) -> tuple[Scorer, Evaluation]:
    """Load and self-test the bundle, score the test set, compute the metrics."""
    scorer = open_scorer(Path(bundle_dir), device=device)
    test = load_test_set(Path(data_dir), scorer.manifest.input)
    training = load_training_folder(Path(data_dir), scorer.manifest.input)
    copies = None
    if training is not None:
        copies = copies_of_training(training, scorer.manifest.input, test)
        _log_copies_of_training(Path(data_dir), copies)
    parts = [
        scorer.score(test.images[rows], keep_maps=True)
        for rows in batch_slices(len(test.paths), batch_size)
    ]
    scores = {name: np.concatenate([p.raw[name] for p in parts]) for name in SCORE_NAMES}
    scores["combined"] = np.concatenate([p.combined for p in parts])
    flagged = np.concatenate([p.is_anomaly for p in parts])
    maps = np.concatenate([p.anomaly_map for p in parts if p.anomaly_map is not None])
    labels = test.labels
    stats = threshold_stats(flagged, labels)
    pixel = _pixel_auroc(test, maps)
    metrics: dict[str, Any] = {
        **{key: auroc(scores[name], labels) for name, key in AUROC_KEYS.items()},
        "auroc_combined": auroc(scores["combined"], labels),
        "aupr_combined": average_precision(scores["combined"], labels),
        "f1_at_threshold": stats.f1,
        "fpr_at_threshold": stats.fpr,
        "tpr_at_threshold": stats.tpr,
        "best_tpr_at_fpr": {
            budget_key(rate): best_tpr_at_fpr(scores["combined"], labels, rate)
            for rate in FPR_BUDGETS
        },
        "at_requested_rate": {
            budget_key(rate): _verdicts_at_rate(scorer, scores["combined"], labels, rate)
            for rate in FPR_BUDGETS
        },
        "threshold": parts[0].threshold,
        "n_normal": int((~labels).sum()),
        "n_anomalous": int(labels.sum()),
        "pixel_auroc": pixel,
        "n_masked": sum(m is not None for m, a in zip(test.masks, labels, strict=True) if a),
        "test_copies_of_training": None if copies is None else len(copies),
        **_against_held_out(scorer, training, scores["combined"], labels),
        "auroc_combined_by_type": _auroc_by_type(test, scores["combined"]),
        "caught_by_defect_area": caught_by_defect_area(test.masks, labels, flagged),
        "model_id": scorer.model_id,
        "provider": scorer.provider,
        "weights": dict(scorer.calibration.weights),
        "local_window": scorer.calibration.local_window,
    }
    # The figures to 4 decimals; the weights are settings and stay as the bundle has them.
    rounded = {k: v if k == "weights" else _rounded(v) for k, v in metrics.items()}
    evaluation = Evaluation(test, scores, flagged, parts[0].threshold, maps, rounded)
    return scorer, evaluation


def _rounded(value: Any) -> Any:
    """``value`` with every float in it, at any depth of dicts, rounded to 4 decimals."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def evaluate_bundle(
    bundle_dir: Path,
    data_dir: Path,
    *,
    report_dir: Path | None = None,
    device: DevicePolicy = "auto",
) -> dict[str, Any]:
    """Metrics of the bundle on ``DATA_DIR/test``; with ``report_dir``, also PNG figures."""
    scorer, evaluation = run_evaluation(bundle_dir, data_dir, device=device)
    if report_dir is not None:
        from training.report import write_report

        files = write_report(Path(report_dir), scorer, evaluation)
        log.info("report: %s", ", ".join(str(f) for f in files))
    return evaluation.metrics
