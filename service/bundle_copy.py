"""A changed copy of a bundle directory, written beside it and named only once it loads.

The commands that change a bundle without training it (``service.upgrade``,
``service.recalibrate``) never touch the bundle they read: they write a copy under
``OUT.partial``, load it and run its golden self-test, and only then rename it ``OUT``. On any
error the partial copy is removed, so ``OUT`` either does not exist or is a working bundle.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.bundle import BundleError
from service.runtime import open_scorer

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class BundleCopy:
    """Where the copy of the bundle directory ``source`` goes: ``out``, by way of ``partial``."""

    source: Path
    out: Path

    @classmethod
    def plan(cls, source: Path, out: Path) -> BundleCopy:
        """The copy of ``source`` to ``out``, or :class:`BundleError` where ``source`` is not a
        bundle directory, ``out`` exists or lies inside it, or a partial copy was left there."""
        source, out = Path(source), Path(out)
        if not source.is_dir():
            what = "does not exist" if not source.exists() else "is not a directory"
            raise BundleError(
                f"bundle {source} {what}: give a bundle directory (unpack an archive first)"
            )
        if out.exists():
            raise BundleError(f"{out} already exists: give a new directory for the new bundle")
        if out.resolve().is_relative_to(source.resolve()):
            raise BundleError(f"{out} is inside {source}: give a directory outside the old bundle")
        copy = cls(source, out)
        if copy.partial.exists():
            raise BundleError(f"{copy.partial} already exists (left by an earlier run?): remove it")
        return copy

    @property
    def partial(self) -> Path:
        """The copy while it is written."""
        return self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """The partial copy, to change; on leaving, it is loaded, self-tested and renamed
        ``out``, or removed if anything failed."""
        try:
            shutil.copytree(self.source, self.partial)
            yield self.partial
            open_scorer(self.partial, device="cpu", threads=1)
            self.partial.rename(self.out)
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise
