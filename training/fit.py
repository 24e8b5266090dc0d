"""``fit``: from a folder of good images to a calibrated, self-checking bundle directory.

Steps: find and load the images through ``service.preprocessing``; split off held-out normals;
train the VAE; export and prove ONNX parity; choose the decision rule and calibrate on the
held-out images with ONNX Runtime outputs; write golden vectors and the manifest into a staging
folder; load that folder exactly as the service does and self-test it; only then move it into
place. A failure at any step leaves no bundle behind.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import PIL
import torch

from service.bundle import (
    BUNDLE_FILES,
    ERROR_REFERENCE,
    GOLDEN,
    LATENT_REFERENCE,
    Golden,
    Manifest,
    compute_model_id,
    load_bundle,
    write_error_reference,
    write_golden,
    write_latent_reference,
    write_manifest,
)
from service.preprocessing import WIDE_SAMPLE_BITS, Images, InputSpec, model_input
from service.runtime import OnnxGraphs, Scorer
from service.scoring import (
    Calibration,
    LatentBaseline,
    LatentGrid,
    batch_slices,
)
from training.calibrate import (
    CHECK_IMAGES,
    REFERENCE_IMAGES,
    SCORING_BATCH,
    RuleChoice,
    calibrate,
    choose_rule,
    describe_lighting,
    describe_rule,
    fit_references,
    lighting_check,
    lighting_warning,
    resolve_window,
    score_held_out,
)
from training.config import FitConfig
from training.copies import copy_groups
from training.data import (
    evenly_spaced,
    find_images,
    holdout_split,
    load_samples,
    resolve_color_mode,
    resolve_input_size,
    resolve_wide_sample_bits,
    split_rows_in_place,
    training_folder,
)
from training.errors import ConfigError, ExportError, TrainingError
from training.export import GOLDEN_TOLERANCE, OPSET, PARITY_EXAMPLES, export_model
from training.kernels import kernels_wider_than_held, why_wider
from training.model import VAE
from training.train import device_kernels, select_device, train_both

__all__ = ["FitConfig", "fit_bundle"]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]

GOLDEN_IMAGES = 4


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TrainingError(f"output {out_dir} exists and is not a folder")
    contents = {p.name for p in out_dir.iterdir()}
    if not contents:
        return
    if not overwrite:
        raise TrainingError(f"output folder {out_dir} is not empty; pass --overwrite to replace it")
    if not contents <= set(BUNDLE_FILES):
        raise TrainingError(
            f"output folder {out_dir} holds files other than a bundle's "
            f"({sorted(contents - set(BUNDLE_FILES))[:3]}); refusing to replace it"
        )


def _check_cpu_kernels(config: FitConfig) -> None:
    if config.cpu_kernels == "native":
        return
    wider = kernels_wider_than_held()
    if wider:
        raise ConfigError(
            f"option cpu_kernels has value {config.cpu_kernels!r} but wider kernels run: "
            f"{'; '.join(wider)}. {why_wider()}"
        )


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def fit_bundle(
    data_dir: Path, out_dir: Path, config: FitConfig | None = None, *, overwrite: bool = False
) -> Path:
    """Train, export, calibrate and self-test; returns the bundle directory ``out_dir``."""
    config = config or FitConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    _check_cpu_kernels(config)
    _check_out_dir(out_dir, overwrite)
    with _torch_threads(config.threads):
        _fit(data_dir, out_dir, config, overwrite)
    return out_dir


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(data_dir: Path, out_dir: Path, config: FitConfig, overwrite: bool) -> None:
    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = select_device(config.device)

    folder = training_folder(data_dir)
    paths = find_images(folder)
    multiple = config.model_config(channels=1).size_multiple
    height, width = resolve_input_size(paths, config.image_size, config.aspect, multiple)
    spec = InputSpec(
        height=height,
        width=width,
        color_mode=resolve_color_mode(paths, config.color_mode),
        resize=config.resize,
        wide_sample_bits=resolve_wide_sample_bits(paths),
    )
    if spec.wide_sample_bits < WIDE_SAMPLE_BITS:
        log.info(
            "16-bit greyscale images whose samples use %d bits: each is read as the top 8 of "
            "them (a sample of %d is white)",
            spec.wide_sample_bits, 2**spec.wide_sample_bits - 1,
        )  # fmt: skip
    images = load_samples(paths, spec, skip_bad=config.skip_bad_images)
    groups = copy_groups(images.images)
    copies = len(images.paths) - (int(groups.max()) + 1)
    if copies:
        first = np.flatnonzero(np.bincount(groups) > 1)[0]
        pair = [images.paths[i].name for i in np.flatnonzero(groups == first)[:2]]
        log.warning(
            "%d images are copies of others (identical or nearly so once preprocessed, e.g. "
            "%s and %s): each lies on the same side of the split as its copies, so that no "
            "held-out image is one the model trained on",
            copies, *pair,
        )  # fmt: skip
    train_idx, holdout_idx = holdout_split(
        len(images.paths),
        fraction=config.holdout_fraction,
        min_holdout=config.min_holdout,
        seed=config.seed,
        groups=groups,
    )
    log.info(
        "%d images from %s (%s, %d skipped), input %dx%d: training on %d, holding out %d; "
        "%d steps (coarse VAE: %d) on %s",
        len(images.paths), folder, spec.color_mode, len(images.skipped), spec.width,
        spec.height, len(train_idx), len(holdout_idx), config.steps_for(len(train_idx)),
        config.coarse_steps_for(len(train_idx)), device,
    )  # fmt: skip
    holdout_files = [images.paths[i].name for i in holdout_idx]
    # The images stay 8-bit samples (a quarter of the model input's memory); the training's
    # crops, the references' and the held-out images are made model input a batch at a time.
    train, holdout = split_rows_in_place(images.images, train_idx, holdout_idx)
    checked = evenly_spaced(len(holdout_idx), CHECK_IMAGES)
    model = VAE(config.model_config(channels=spec.channels))
    result, coarse = train_both(
        model, train, model_input(holdout[checked], spec.scale), config, device, scale=spec.scale
    )
    log.info("training: %s; coarse VAE: %s", result.stop_reason, coarse.stop_reason)
    facts = {
        "data": {
            "folder": str(folder.resolve()),
            "fingerprint": images.fingerprint,
            "n_images": len(images.paths),
            "n_train": len(train_idx),
            "n_holdout": len(holdout_idx),
            "copies": copies,
            "holdout_files": holdout_files,
            "skipped": [{"file": str(p), "reason": r} for p, r in images.skipped],
        },
        "split": "one held-out split of the normal images serves validation, the choice "
        "of the decision rule and calibration; it is never trained on",
        "loss": "negative ELBO: Gaussian pixel NLL with the batch's maximum-likelihood sigma "
        f"(calibrated decoder) + beta * KL, beta={config.beta}",
        "training": result.summary(),
        "coarse_training": coarse.summary(),
        "device_trained_on": str(device),
        "device_kernels": device_kernels(device),
    }
    build_bundle(
        result.model,
        train,
        holdout,
        spec,
        out_dir,
        config=config,
        facts=facts,
        overwrite=overwrite,
    )
    log.info("wrote bundle %s in %.0f s", out_dir, time.monotonic() - started)


def build_bundle(
    model: VAE,
    train: Images,
    holdout: Images,
    spec: InputSpec,
    out_dir: Path,
    *,
    config: FitConfig,
    facts: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Export ``model``, fit the latent and error references on ``train`` (over the lighting
    range of the training's jitter), choose the rule, calibrate on ``holdout`` and write a
    checked bundle. Both are 8-bit samples read at the spec's scale, or model input; memory
    holds a batch of either at a time as model input, and the checks' subset.

    The bundle is assembled in a staging folder next to ``out_dir`` and moved into place only
    after it has passed the service's own loading and self-test; on any failure nothing is left.
    """
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        calibration, choice = _export_and_calibrate(
            model, train, holdout, spec, staging, config, facts
        )
        # The training's ONNX Runtime sessions are gone by now: the self-check's are the only ones.
        _self_check(staging, holdout, spec.scale, calibration, choice)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _export_and_calibrate(
    model: VAE,
    train: Images,
    holdout: Images,
    spec: InputSpec,
    staging: Path,
    config: FitConfig,
    facts: Mapping[str, Any],
) -> tuple[Calibration, RuleChoice]:
    """Everything of :func:`build_bundle` that reads the graphs: the exported model, its
    references, rule, calibration, golden vectors and manifest, written into ``staging``."""
    graphs, parity = export_model(
        model, staging, model_input(holdout[:PARITY_EXAMPLES], spec.scale), threads=config.threads
    )
    grid = LatentGrid(model.cfg.latent_channels, *model.cfg.grid(spec.height, spec.width))
    referenced = train[evenly_spaced(train.shape[0], REFERENCE_IMAGES)]
    reference, errors = fit_references(
        graphs, referenced, grid, lighting=config.jitter, scale=spec.scale
    )
    held_out = score_held_out(
        graphs,
        holdout,
        scale=spec.scale,
        window=resolve_window(config.local_window, spec.height, spec.width),
        reference=reference,
        errors=errors,
        checked=evenly_spaced(holdout.shape[0], CHECK_IMAGES),
    )
    check_images, check_out = held_out.check_images, held_out.check_out
    subsets = {
        "reference_images": referenced.shape[0],
        "check_images": check_images.shape[0],
        "of_training": train.shape[0],
        "of_held_out": holdout.shape[0],
    }
    if referenced.shape[0] < train.shape[0] or check_images.shape[0] < holdout.shape[0]:
        log.info(
            "references from %d of %d training images; checks on %d of %d held-out images "
            "(calibration on all)",
            referenced.shape[0], train.shape[0], check_images.shape[0], holdout.shape[0],
        )  # fmt: skip
    baseline = LatentBaseline.fit(held_out.mu)
    write_latent_reference(staging / LATENT_REFERENCE, reference, baseline)
    write_error_reference(staging / ERROR_REFERENCE, errors)
    choice = choose_rule(
        graphs,
        reference,
        errors,
        check_images,
        check_out,
        seed=config.seed,
        local_window=config.local_window,
        weights=config.weights,
    )
    log.info(
        "decision rule: window %d, weights %s (synthetic-defect AUROC %.3f)",
        choice.local_window,
        dict(choice.weights),
        choice.synthetic_auroc,
    )
    calibration = calibrate(
        held_out, choice, target_false_alarm_rate=config.target_false_alarm_rate
    )
    log.info("%s", describe_rule(calibration.rule, holdout.shape[0]))
    lighting = None
    if config.jitter > 0:
        check = lighting_check(
            graphs,
            reference,
            errors,
            check_images,
            check_out,
            calibration,
            change=config.jitter,
        )
        log.info("%s", describe_lighting(check))
        warning = lighting_warning(check)
        if warning is not None:
            log.warning("%s", warning)
        lighting = check.to_dict()
    training = {
        "config": config.to_dict(),
        "model": model.cfg.to_dict(),
        **facts,
        "decision": choice.to_dict(),
        "subsets": subsets,
        "lighting": lighting,
        "export": {"parity": parity.to_dict(), "opset": OPSET},
        "seed": config.seed,
        "versions": _versions(),
    }
    golden_inputs = model_input(holdout[:GOLDEN_IMAGES], spec.scale)
    _write_bundle(
        staging, graphs, golden_inputs, spec, grid, calibration, training, config.model_version
    )
    return calibration, choice


def _write_bundle(
    staging: Path,
    graphs: OnnxGraphs,
    golden_inputs: F32Array,
    spec: InputSpec,
    grid: LatentGrid,
    calibration: Calibration,
    training: dict[str, Any],
    model_version: str,
) -> None:
    inputs = np.ascontiguousarray(golden_inputs)
    out = graphs.run(inputs)
    write_golden(staging / GOLDEN, Golden.of(inputs, out))
    manifest = Manifest(
        model_id=compute_model_id(staging),
        model_version=model_version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        input=spec,
        latent=grid,
        calibration=calibration,
        golden_tolerance=GOLDEN_TOLERANCE,
        training=training,
    )
    write_manifest(staging, manifest)


def _self_check(
    staging: Path,
    holdout: Images,
    scale: float,
    calibration: Calibration,
    choice: RuleChoice,
) -> None:
    """Load the staged bundle as the service does and reproduce the calibration scores."""
    scorer = Scorer(load_bundle(staging), device="cpu")
    scorer.self_test()
    batches = [
        scorer.score(model_input(holdout[rows], scale)).raw
        for rows in batch_slices(holdout.shape[0], SCORING_BATCH)
    ]
    for name, cal in calibration.scores.items():
        expected = np.sort(np.asarray(cal.values))
        actual = np.sort(np.concatenate([raw[name] for raw in batches]))
        if not np.allclose(actual, expected, rtol=1e-3, atol=1e-6):
            raise ExportError(
                f"the service's {name} scores of the held-out images differ from those the "
                f"bundle was calibrated on (window {choice.local_window}); refusing the bundle"
            )
