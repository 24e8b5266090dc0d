"""Image decoding and preprocessing: the one implementation used by training and serving.

Every image, whether a file on disk during training or bytes on the wire during serving, goes
through :func:`decode_image` (or :func:`image_from_raw`) and then :func:`preprocess`, driven by the
:class:`InputSpec` stored in the bundle's manifest. The pixel scale is fixed by the spec (8-bit
samples divided by 255; 16-bit greyscale samples first reduced to the top 8 of the bits the
training images used, which the fit records), never guessed from the image being scored.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

ColorMode = Literal["L", "RGB"]
ResizeMethod = Literal["bilinear", "bicubic", "nearest", "lanczos", "box"]

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# Pillow's modes of 16-bit greyscale images.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
WIDE_SAMPLE_BITS = 16
PIXEL_SCALE = 1.0 / 255.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 50_000_000
RAW_CHANNELS = (1, 3, 4)

_RESAMPLING: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class ImageError(ValueError):
    """An image that cannot be decoded or does not meet the limits; the message says why."""


@dataclass(frozen=True)
class InputSpec:
    """How raw images become model input: size, colour mode, resampling and pixel scale."""

    height: int
    width: int
    color_mode: ColorMode = "RGB"
    resize: ResizeMethod = "bilinear"
    # Model input = 8-bit sample value * scale: pixels in [0, 1].
    scale: float = PIXEL_SCALE
    # The bits a 16-bit greyscale image's samples use (12 for a 12-bit camera's 0-4095): its
    # 8-bit value is the top 8 of them, sample >> (wide_sample_bits - 8), at most 255.
    wide_sample_bits: int = WIDE_SAMPLE_BITS

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"InputSpec size must be positive, got {self.height}x{self.width}")
        if self.color_mode not in ("L", "RGB"):
            raise ValueError(f"InputSpec color_mode is {self.color_mode!r}; expected 'L' or 'RGB'")
        if self.resize not in _RESAMPLING:
            raise ValueError(
                f"InputSpec resize is {self.resize!r}; expected one of {sorted(_RESAMPLING)}"
            )
        if not 8 <= self.wide_sample_bits <= WIDE_SAMPLE_BITS:
            raise ValueError(
                f"InputSpec wide_sample_bits is {self.wide_sample_bits}; expected 8 to "
                f"{WIDE_SAMPLE_BITS}"
            )

    @property
    def channels(self) -> int:
        """Number of model input channels."""
        return 1 if self.color_mode == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image model input shape (C, H, W)."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        return {**asdict(self), "channels": self.channels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        fields = dict(data)
        channels = fields.pop("channels", None)
        unknown = set(fields) - {f.name for f in dataclass_fields(cls)}
        if unknown:
            raise ValueError(f"unknown input spec fields: {sorted(unknown)}")
        spec = cls(**fields)
        if channels is not None and channels != spec.channels:
            raise ValueError(
                f"input spec says channels={channels} but color_mode={spec.color_mode!r} "
                f"has {spec.channels}"
            )
        return spec


def _check_size(width: int, height: int, max_pixels: int, image_id: str) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"image {image_id!r} has size {width}x{height}; both must be at least 1")
    if width * height > max_pixels:
        raise ImageError(
            f"image {image_id!r} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels"
        )


def decode_image(
    data: bytes, *, image_id: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode PNG/JPEG/BMP/TIFF bytes, checking the pixel limit before decoding the pixels."""
    if not data:
        raise ImageError(f"image {image_id!r} has no bytes; expected an encoded PNG/JPEG/BMP/TIFF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            _check_size(image.width, image.height, max_pixels, image_id)
            image.load()
        if image.mode in ("I", "F"):
            raise ImageError(
                f"image {image_id!r} has 32-bit samples (mode {image.mode!r}), which are not "
                "supported; send 8- or 16-bit images"
            )
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {image_id!r} is over the limit of {max_pixels} pixels and too large to "
            f"decode safely: {exc}"
        ) from exc
    except UnidentifiedImageError as exc:  # its message names a memory address: leave it out
        raise ImageError(
            f"image {image_id!r} could not be decoded as PNG, JPEG, BMP or TIFF "
            f"({len(data)} bytes): not a file of these formats"
        ) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ImageError(
            f"image {image_id!r} could not be decoded as PNG, JPEG, BMP or TIFF "
            f"({len(data)} bytes): {exc}"
        ) from exc
    return image


def image_from_raw(
    pixels: bytes,
    height: int,
    width: int,
    channels: int,
    *,
    image_id: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Wrap raw row-major HWC uint8 pixels as an image, validating their shape."""
    _check_size(width, height, max_pixels, image_id)
    if channels not in RAW_CHANNELS:
        raise ImageError(
            f"image {image_id!r} has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)"
        )
    expected = height * width * channels
    if len(pixels) != expected:
        raise ImageError(
            f"image {image_id!r} has {len(pixels)} bytes of raw pixels; expected "
            f"{height}x{width}x{channels} = {expected}"
        )
    array = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB" if channels == 3 else "RGBA")


def wide_sample_max(image: Image.Image) -> int | None:
    """The largest sample of a 16-bit greyscale image; ``None`` for an image of another mode."""
    if image.mode not in WIDE_GREY_MODES:
        return None
    return int(np.asarray(image, dtype=np.uint16).max())


def _to_8bit_mode(image: Image.Image, spec: InputSpec) -> Image.Image:
    color_mode = spec.color_mode
    if image.mode in WIDE_GREY_MODES:
        # The top 8 of the bits the samples use: exact and documented (4095 -> 255 at 12 bits);
        # a sample beyond them saturates, as a brighter-than-ever pixel of an 8-bit camera does.
        shifted = np.asarray(image, dtype=np.uint16) >> (spec.wide_sample_bits - 8)
        image = Image.fromarray(np.minimum(shifted, 255).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        raise ImageError(
            f"image mode {image.mode!r} (32-bit samples) is not supported; send 8- or 16-bit images"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA" if color_mode == "RGB" else "LA")
    return image if image.mode == color_mode else image.convert(color_mode)


def preprocess(image: Image.Image, spec: InputSpec) -> npt.NDArray[np.float32]:
    """Convert colour, resize and scale one image to the model input ``(C, H, W)`` float32."""
    out = np.empty(spec.shape, dtype=np.float32)
    preprocess_into(image, spec, out)
    return out


def preprocess_into(image: Image.Image, spec: InputSpec, out: npt.NDArray[np.float32]) -> None:
    """Like :func:`preprocess`, writing into ``out`` (``(C, H, W)`` float32, e.g. a batch row).

    The 8-bit samples are scaled straight into ``out`` in one pass, so filling a preallocated
    batch costs no intermediate float copies; the values are those of :func:`preprocess`.
    """
    if out.shape != spec.shape or out.dtype != np.float32:
        raise ValueError(f"output has shape {out.shape} {out.dtype}; expected {spec.shape} float32")
    np.multiply(pixels(image, spec), np.float32(spec.scale), out=out, dtype=np.float32)


def pixels(image: Image.Image, spec: InputSpec) -> npt.NDArray[np.uint8]:
    """One image's 8-bit samples ``(C, H, W)`` in the spec's colour mode and size: the model
    input before its scale (:func:`model_input`), in a quarter of its memory."""
    image = _to_8bit_mode(image, spec)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), _RESAMPLING[spec.resize])
    hwc = np.asarray(image)  # (H, W) or (H, W, C) uint8
    return hwc[None, :, :] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)


# Images as a fit holds them: 8-bit samples (:func:`pixels`) or model input; model_input reads both.
Images = npt.NDArray[np.uint8] | npt.NDArray[np.float32]


def model_input(samples: Images, scale: float = PIXEL_SCALE) -> npt.NDArray[np.float32]:
    """The model input of 8-bit samples ``(..., C, H, W)`` (:func:`pixels`), each times
    ``scale`` (the spec's): the values :func:`preprocess` gives. Model input (float32) is
    returned as it is."""
    if samples.dtype == np.float32:
        return np.asarray(samples, dtype=np.float32)
    if samples.dtype != np.uint8:
        raise ValueError(f"samples are {samples.dtype}; expected uint8 (or float32 model input)")
    return np.multiply(samples, np.float32(scale), dtype=np.float32)


def preprocess_bytes(
    data: bytes, spec: InputSpec, *, image_id: str = "", max_pixels: int = DEFAULT_MAX_PIXELS
) -> npt.NDArray[np.float32]:
    """Decode encoded bytes and preprocess them in one step."""
    return preprocess(decode_image(data, image_id=image_id, max_pixels=max_pixels), spec)


class FolderFingerprint:
    """A fingerprint of a folder's images as read: each file's name and content, in the order
    added. A fit records its training folder's in the manifest, so that a folder can be told
    to be the one a bundle was trained on."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, data: bytes) -> None:
        """Add one file, ``data`` being its bytes."""
        self._digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())

    def hexdigest(self) -> str:
        """The fingerprint: 16 hex digits."""
        return self._digest.hexdigest()[:16]


Decoded = TypeVar("Decoded")


@dataclass
class ImageFiles:
    """A folder's image files read in turn: the fingerprint of those read, and the unreadable
    ones skipped (with why) where ``skip_bad``; otherwise the first unreadable one raises
    ``error`` with a message that names it."""

    skip_bad: bool
    error: Callable[[str], Exception]
    fingerprint: FolderFingerprint = field(default_factory=FolderFingerprint)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def read(
        self, paths: Iterable[Path], decode: Callable[[bytes, str], Decoded]
    ) -> Iterator[tuple[Path, Decoded]]:
        """Each readable file of ``paths`` with ``decode(its bytes, its path)``."""
        for path in paths:
            try:
                data = path.read_bytes()
                decoded = decode(data, str(path))
            except (OSError, ImageError) as exc:
                if not self.skip_bad:
                    raise self.error(
                        f"cannot use image {path}: {exc} (pass --skip-bad-images to skip such "
                        "files)"
                    ) from exc
                log.warning("skipping unreadable image %s: %s", path, exc)
                self.skipped.append((path, str(exc)))
                continue
            self.fingerprint.add(path.name, data)
            yield path, decoded


def load_image_file(path: Path, spec: InputSpec) -> npt.NDArray[np.float32]:
    """Read and preprocess one image file; the error names the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc}") from exc
    return preprocess_bytes(data, spec, image_id=str(path))


def list_image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files (by suffix) in a folder, sorted; optionally descending into subfolders."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def stack(images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    """Stack preprocessed images into one contiguous ``(N, C, H, W)`` batch."""
    return np.ascontiguousarray(np.stack(images, axis=0))
