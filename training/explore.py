"""``explore``: the latent space of a bundle, computed through its own ONNX files.

Encodes the normal images (``train/good`` of an MVTec-layout folder, or a plain folder) and, where
there is a ``test/`` split, the test images; then computes a 2-D map of the posterior means (PCA of
the normal ones, and t-SNE), how far each defect class lies from the normal latents,
interpolations, traversals along the principal directions, decoded samples, and each defective
image's nearest normal neighbours. :mod:`training.explore_report` writes it out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.preprocessing import list_image_files
from service.runtime import DevicePolicy, Scorer, open_scorer
from service.scoring import batch_slices, kl_divergence
from training.data import find_images, load_images, training_folder
from training.errors import DataError
from training.evaluate import NORMAL, TestSet, load_test_set
from training.metrics import auroc

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

BATCH = 32
MIN_IMAGES = 3
DISTANCE_K = 5  # normal neighbours averaged in the latent distance score
NEIGHBOURS = 3  # nearest normal images shown per defective image
INTERPOLATION_STEPS = 9
TRAVERSAL_SIGMAS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
TRAVERSAL_COMPONENTS = 4
SAMPLES = 8
MAX_DEFECT_STRIPS = 6
ACTIVE_VARIANCE = 0.01  # a latent dimension is active when its mean varies more than this
TSNE_MIN_POINTS = 6
# Exact t-SNE up to this many points: on a few hundred it is faster than Barnes-Hut, whose
# OpenMP workers also spin for cores they do not get on a busy machine (one job here).
TSNE_EXACT_MAX = 1000
DISTANCE_SCORE = (
    "mean Euclidean distance from an image's posterior mean to the posterior means of its "
    "{k} nearest normal training images"
)


@dataclass(frozen=True)
class Encoded:
    """Images with their posterior means, log-variances and reconstructions."""

    paths: tuple[Path, ...]
    labels: tuple[str, ...]  # the folder each image came from, e.g. "train/good", "test/crack"
    images: F32Array  # (N, C, H, W)
    mu: F32Array  # (N, D)
    logvar: F32Array  # (N, D)
    recon: F32Array  # (N, C, H, W)
    defect_map: F32Array  # (N, H, W): the defect head's anomaly probability per pixel


@dataclass(frozen=True)
class Pca:
    """Principal directions of the normal posterior means."""

    mean: F64Array  # (D,)
    components: F64Array  # (K, D), unit rows, by decreasing variance
    sigma: F64Array  # (K,) standard deviation of the normal latents along each direction
    explained: F64Array  # (K,) share of the normal latents' total variance

    def project(self, mu: F32Array, k: int = 2) -> F64Array:
        """Coordinates of ``mu`` ``(N, D)`` on the first ``k`` directions: ``(N, k)``."""
        return np.asarray((mu.astype(np.float64) - self.mean) @ self.components[:k].T)


@dataclass(frozen=True)
class LatentMap:
    """2-D coordinates of every image: normal images first, then the test images."""

    pca: F64Array  # (N, 2)
    tsne: F64Array | None  # (N, 2)
    perplexity: float | None
    method: str | None  # of t-SNE: "exact" or "barnes_hut"


@dataclass(frozen=True)
class ClassSeparation:
    """How well one defect class separates from test/good by the latent distance alone."""

    n: int
    auroc_distance: float
    auroc_kl: float
    median_distance: float


@dataclass(frozen=True)
class Strip:
    """Decoded points evenly spaced on the line between two images' posterior means."""

    kind: str  # "good to good" or "good to defective"
    start: tuple[str, Path, F32Array]  # label, file, preprocessed input (C, H, W)
    end: tuple[str, Path, F32Array]
    t: F64Array  # (S,) from 0 to 1
    frames: F32Array  # (S, C, H, W)


@dataclass(frozen=True)
class Traversal:
    """Decoded steps from the normal mean along one principal direction."""

    component: int  # 0-based
    explained: float
    sigma: float
    steps: tuple[float, ...]  # in units of sigma
    frames: F32Array  # (S, C, H, W)


@dataclass(frozen=True)
class Samples:
    """Real normal inputs beside decoded samples of the prior and of the normal latents."""

    real: F32Array  # (S, C, H, W)
    prior: F32Array
    normal: F32Array


@dataclass(frozen=True)
class DefectCase:
    """A defective test image and its nearest normal training images in latent space."""

    index: int  # into Exploration.test
    neighbours: tuple[int, ...]  # into Exploration.normal
    distances: tuple[float, ...]


@dataclass(frozen=True)
class LatentStats:
    """Summary numbers of the normal posteriors."""

    latent_dim: int
    active_dims: int  # dimensions whose posterior mean varies across normal images > 0.01
    mean_kl: float
    mean_posterior_std: float  # of q(z|x), averaged over images and dimensions
    mean_spread: float  # standard deviation of the posterior means across images, averaged


@dataclass(frozen=True)
class Exploration:
    """Everything ``explore`` computed; arrays keep the order of ``normal`` and ``test``."""

    scorer: Scorer
    data_dir: Path
    normal: Encoded
    test: Encoded | None
    test_set: TestSet | None
    maps: F32Array | None  # (N_test, H, W) anomaly maps of the test images
    pca: Pca
    latent_map: LatentMap
    distance_k: int
    test_distance: F64Array | None  # (N_test,) latent distance score of each test image
    separation: dict[str, ClassSeparation]
    strips: tuple[Strip, ...]
    traversals: tuple[Traversal, ...]
    samples: Samples
    defects: tuple[DefectCase, ...]
    stats: LatentStats
    skipped: tuple[tuple[str, str], ...]  # (what, why)
    seed: int


def encode(
    scorer: Scorer, paths: tuple[Path, ...], labels: tuple[str, ...], x: F32Array
) -> Encoded:
    """Posterior means, log-variances and reconstructions of ``x`` through the bundle."""
    outs = [scorer.run_model(np.ascontiguousarray(x[rows])) for rows in batch_slices(len(x), BATCH)]
    return Encoded(
        paths,
        labels,
        x,
        np.concatenate([o.mu for o in outs]),
        np.concatenate([o.logvar for o in outs]),
        np.concatenate([o.recon for o in outs]),
        np.concatenate([o.defect_map for o in outs]),
    )


def decode(scorer: Scorer, z: F64Array) -> F32Array:
    """Decoded images ``(N, C, H, W)`` of latents ``z`` ``(N, D)``."""
    z32 = z.astype(np.float32)
    return np.concatenate(
        [scorer.decode(np.ascontiguousarray(z32[rows])) for rows in batch_slices(len(z), BATCH)]
    )


def fit_pca(mu: F32Array) -> Pca:
    """Principal directions of ``mu`` ``(N, D)`` with non-zero variance, signs made definite."""
    x = mu.astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = s**2 / max(1, len(x) - 1)
    total = float(variance.sum())
    keep = variance > total * 1e-9
    vt, variance = vt[keep], variance[keep]
    # A definite sign, so that reruns draw the same map: each direction's largest entry > 0.
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])[:, None]
    return Pca(mean, vt, np.sqrt(variance), variance / total if total > 0 else variance)


def distances(a: F32Array, b: F32Array) -> F64Array:
    """Euclidean distances between the rows of ``a`` ``(N, D)`` and ``b`` ``(M, D)``: ``(N, M)``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    squared = (a64**2).sum(axis=1)[:, None] + (b64**2).sum(axis=1)[None, :] - 2 * a64 @ b64.T
    return np.asarray(np.sqrt(np.maximum(squared, 0.0)), dtype=np.float64)


def _latent_map(pca: Pca, mu: F32Array, seed: int, skipped: list[tuple[str, str]]) -> LatentMap:
    n = len(mu)
    coords = np.zeros((n, 2))
    shown = pca.project(mu, 2)
    coords[:, : shown.shape[1]] = shown
    if n < TSNE_MIN_POINTS:
        skipped.append(("t-SNE map", f"{n} images; t-SNE needs at least {TSNE_MIN_POINTS}"))
        return LatentMap(coords, None, None, None)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (n - 1) / 3)
    method = "exact" if n <= TSNE_EXACT_MAX else "barnes_hut"
    tsne = TSNE(perplexity=perplexity, init="pca", method=method, random_state=seed, n_jobs=1)
    embedded = np.asarray(tsne.fit_transform(mu.astype(np.float64)), dtype=np.float64)
    return LatentMap(coords, embedded, perplexity, method)


def _separation(
    kinds: tuple[str, ...], test: Encoded, distance: F64Array, skipped: list[tuple[str, str]]
) -> dict[str, ClassSeparation]:
    labels = np.array(kinds)
    good = labels == NORMAL
    defects = sorted(set(kinds) - {NORMAL})
    what = "separation of the defect classes"
    if not good.any():
        skipped.append((what, "test/good holds no images; each defect class is compared with it"))
        return {}
    if not defects:
        skipped.append((what, "test/ holds no defective images, only test/good"))
        return {}
    kl = kl_divergence(test.mu, test.logvar)
    result: dict[str, ClassSeparation] = {}
    for kind in defects:
        keep = good | (labels == kind)
        positive = labels[keep] == kind
        result[kind] = ClassSeparation(
            n=int(positive.sum()),
            auroc_distance=auroc(distance[keep], positive),
            auroc_kl=auroc(kl[keep], positive),
            median_distance=float(np.median(distance[labels == kind])),
        )
    return result


def _item(images: Encoded, index: int) -> tuple[str, Path, F32Array]:
    return images.labels[index], images.paths[index], images.images[index]


def _strip(scorer: Scorer, kind: str, a: Encoded, i: int, b: Encoded, j: int) -> Strip:
    t = np.linspace(0.0, 1.0, INTERPOLATION_STEPS)
    mu_a, mu_b = a.mu[i].astype(np.float64), b.mu[j].astype(np.float64)
    z = (1 - t)[:, None] * mu_a[None, :] + t[:, None] * mu_b[None, :]
    return Strip(kind, _item(a, i), _item(b, j), t, decode(scorer, z))


def _strips(
    scorer: Scorer,
    normal: Encoded,
    pca: Pca,
    test: Encoded | None,
    defect_cases: tuple[DefectCase, ...],
    test_distance: F64Array | None,
) -> tuple[Strip, ...]:
    """Between the normal images at both ends of PC1 and PC2; from each defect class's image
    furthest from the normal latents to its nearest normal image."""
    strips: list[Strip] = []
    coords = pca.project(normal.mu, 2)
    for axis in range(coords.shape[1]):
        low, high = int(coords[:, axis].argmin()), int(coords[:, axis].argmax())
        strips.append(_strip(scorer, "good to good", normal, low, normal, high))
    if test is None or test_distance is None:
        return tuple(strips)
    furthest: dict[str, DefectCase] = {}
    for case in defect_cases:
        label = test.labels[case.index]
        best = furthest.get(label)
        if best is None or test_distance[case.index] > test_distance[best.index]:
            furthest[label] = case
    for label in sorted(furthest)[:MAX_DEFECT_STRIPS]:
        case = furthest[label]
        strips.append(
            _strip(scorer, "good to defective", normal, case.neighbours[0], test, case.index)
        )
    return tuple(strips)


def _traversals(scorer: Scorer, pca: Pca) -> tuple[Traversal, ...]:
    steps = np.array(TRAVERSAL_SIGMAS)
    result = []
    for j in range(min(TRAVERSAL_COMPONENTS, len(pca.components))):
        z = pca.mean[None, :] + np.outer(steps * pca.sigma[j], pca.components[j])
        frames = decode(scorer, z)
        result.append(
            Traversal(j, float(pca.explained[j]), float(pca.sigma[j]), TRAVERSAL_SIGMAS, frames)
        )
    return tuple(result)


def _samples(scorer: Scorer, normal: Encoded, pca: Pca, seed: int) -> Samples:
    """Decoded draws from N(0, I) and from the Gaussian with the normal means' mean and
    covariance (spanned exactly by the principal directions)."""
    rng = np.random.default_rng(seed)
    n = len(normal.paths)
    real = normal.images[np.sort(rng.choice(n, min(SAMPLES, n), replace=False))]
    prior = rng.standard_normal((SAMPLES, scorer.manifest.latent_dim))
    eps = rng.standard_normal((SAMPLES, len(pca.sigma)))
    fitted = pca.mean[None, :] + (eps * pca.sigma[None, :]) @ pca.components
    return Samples(real, decode(scorer, prior), decode(scorer, fitted))


def _stats(normal: Encoded) -> LatentStats:
    spread = normal.mu.astype(np.float64).var(axis=0)
    return LatentStats(
        latent_dim=normal.mu.shape[1],
        active_dims=int((spread > ACTIVE_VARIANCE).sum()),
        mean_kl=float(kl_divergence(normal.mu, normal.logvar).mean()),
        mean_posterior_std=float(np.exp(0.5 * normal.logvar.astype(np.float64)).mean()),
        mean_spread=float(np.sqrt(spread).mean()),
    )


def _load_normal(data_dir: Path, scorer: Scorer, skip_bad: bool) -> Encoded:
    folder = training_folder(data_dir)
    label = "train/good" if folder != data_dir else (folder.resolve().name or "images")
    images = load_images(find_images(folder), scorer.manifest.input, skip_bad=skip_bad)
    if len(images.paths) < MIN_IMAGES:
        raise DataError(
            f"{folder} holds {len(images.paths)} usable images; explore needs at least {MIN_IMAGES}"
        )
    log.info("encoding %d images of %s", len(images.paths), folder)
    return encode(scorer, images.paths, (label,) * len(images.paths), images.images)


def _load_test(
    data_dir: Path, scorer: Scorer, skipped: list[tuple[str, str]]
) -> tuple[TestSet, Encoded] | None:
    test_dir = data_dir / "test"
    if not test_dir.is_dir() or not list_image_files(test_dir, recursive=True):
        why = f"{data_dir} has no test/ folder of images (MVTec layout: test/good, test/<defect>)"
        for what in (
            "separation of the defect classes",
            "good-to-defective interpolations",
            "defective images and their nearest normal neighbours",
        ):
            skipped.append((what, why))
        return None
    test_set = load_test_set(data_dir, scorer.manifest.input, need_both=False)
    kinds = sorted(set(test_set.kinds))
    log.info("encoding %d test images (%s)", len(test_set.paths), ", ".join(kinds))
    labels = tuple(f"test/{kind}" for kind in test_set.kinds)
    return test_set, encode(scorer, test_set.paths, labels, test_set.images)


def explore(
    bundle_dir: Path,
    data_dir: Path,
    *,
    device: DevicePolicy = "auto",
    seed: int = 0,
    skip_bad: bool = False,
) -> Exploration:
    """Load the bundle, encode the data, and compute everything the report shows."""
    bundle_dir, data_dir = Path(bundle_dir), Path(data_dir)
    scorer = open_scorer(bundle_dir, device=device)
    manifest = scorer.manifest
    log.info(
        "bundle %s: model %s, input %dx%d %s, latent size %d, on %s",
        bundle_dir,
        manifest.model_id,
        manifest.input.height,
        manifest.input.width,
        manifest.input.color_mode,
        manifest.latent_dim,
        scorer.provider,
    )
    skipped: list[tuple[str, str]] = []
    normal = _load_normal(data_dir, scorer, skip_bad)
    loaded = _load_test(data_dir, scorer, skipped)
    test_set, test = loaded if loaded is not None else (None, None)

    pca = fit_pca(normal.mu)
    everything = normal.mu if test is None else np.concatenate([normal.mu, test.mu])
    log.info("map: PCA and t-SNE of %d posterior means", len(everything))
    latent_map = _latent_map(pca, everything, seed, skipped)

    k = min(DISTANCE_K, len(normal.paths))
    maps = test_distance = None
    separation: dict[str, ClassSeparation] = {}
    defects: list[DefectCase] = []
    if test is not None and test_set is not None:
        maps = test.defect_map
        d = distances(test.mu, normal.mu)
        test_distance = np.sort(d, axis=1)[:, :k].mean(axis=1)
        separation = _separation(test_set.kinds, test, test_distance, skipped)
        for i in np.flatnonzero(test_set.labels):
            order = np.argsort(d[i], kind="stable")[:NEIGHBOURS]
            defects.append(
                DefectCase(int(i), tuple(map(int, order)), tuple(map(float, d[i, order])))
            )
        if not defects:
            for what in ("good-to-defective interpolations", "defective images"):
                skipped.append((what, "test/ holds no defective images, only test/good"))
    log.info("decoding interpolations, traversals and samples")
    strips = _strips(scorer, normal, pca, test, tuple(defects), test_distance)
    traversals = _traversals(scorer, pca)
    if not pca.sigma.size:
        for what in ("good-to-good interpolations", "traversals"):
            skipped.append((what, "the posterior means of the normal images do not vary"))
    return Exploration(
        scorer=scorer,
        data_dir=data_dir,
        normal=normal,
        test=test,
        test_set=test_set,
        maps=maps,
        pca=pca,
        latent_map=latent_map,
        distance_k=k,
        test_distance=test_distance,
        separation=separation,
        strips=strips,
        traversals=traversals,
        samples=_samples(scorer, normal, pca, seed),
        defects=tuple(defects),
        stats=_stats(normal),
        skipped=tuple(skipped),
        seed=seed,
    )
