"""The cache manifest version a run is pinned to: read at setup, saved in checkpoints, checked on resume.

A ``medmae prep`` rerun can add, update or remove series; a resumed run on that cache would not
continue the same data stream. ``data.cache_changed`` says whether that stops the run (``error``,
the default) or only warns (``warn``). Under DDP every rank must index the same manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medmae.data.cache import Manifest, load_manifest

logger = logging.getLogger(__name__)

#: ``cache_changed`` values: refuse, or warn and go on with the new manifest.
CACHE_CHANGED_POLICIES = ("error", "warn")


class CacheChangedError(RuntimeError):
    """The cache's manifest is not the version the run (or the checkpoint it resumes) started on."""


def read_manifest(cache_dir: Path) -> Manifest:
    """The cache's manifest; a missing or bad cache is one line naming ``data.cache_dir``."""
    if not cache_dir.exists():
        raise FileNotFoundError(f"data.cache_dir {cache_dir} does not exist; run `medmae prep` first")
    if not cache_dir.is_dir():
        raise NotADirectoryError(f"data.cache_dir {cache_dir} is not a directory")
    try:
        return load_manifest(cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"data.cache_dir: {e}") from e


class ManifestPin:
    """LightningDataModule mixin: pin the manifest version, save it in checkpoints, check it on resume.

    The host class sets ``cache_dir``, ``cache_changed`` and ``manifest_version = None`` /
    ``_pinned_manifest = None`` and calls :meth:`_pin_manifest` with every manifest it reads.
    """

    cache_dir: Path
    cache_changed: str
    manifest_version: str | None
    _pinned_manifest: str | None
    trainer: Any

    def _pin_manifest(self, version: str) -> None:
        """Take ``version`` as this run's manifest, unless it differs from the one already pinned."""
        self._same_version_on_every_rank(version)
        if self.manifest_version is not None and version != self.manifest_version:
            self._cache_changed(self.manifest_version, version, "this run set up its first split on")
        self.manifest_version = version
        if self._pinned_manifest is not None:
            self._check_pinned()

    def _cache_changed(self, pinned: str, now: str, what: str) -> None:
        head = (
            f"data.cache_dir {self.cache_dir}: manifest version {now} is not version {pinned} that {what} "
            "(`medmae prep` changed the cache since), so the run does not continue the same data stream"
        )
        if self.cache_changed == "error":
            raise CacheChangedError(
                f"{head}; restore that cache or, to train on the new one, set data.cache_changed: warn"
            )
        logger.warning("%s (data.cache_changed: warn: going on with version %s)", head, now)

    def _check_pinned(self) -> None:
        assert self._pinned_manifest is not None and self.manifest_version is not None
        if self._pinned_manifest != self.manifest_version:
            pinned, self._pinned_manifest = self._pinned_manifest, None
            self._cache_changed(pinned, self.manifest_version, "the checkpoint was trained on")

    def _same_version_on_every_rank(self, version: str) -> None:
        """Under DDP every rank must index the same manifest: a prep swap between two ranks' setups
        would give them different indices (and a hang at the first collective). All ranks decide together."""
        trainer = self.trainer
        if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return
        strategy = trainer.strategy
        same = strategy.broadcast(version, src=0) == version
        if not strategy.reduce_boolean_decision(same, all=True):
            raise CacheChangedError(
                f"data.cache_dir {self.cache_dir}: the ranks read different manifest versions at setup (`medmae "
                "prep` swapped the manifest while the run started); start the run again"
            )

    def state_dict(self) -> dict[str, Any]:
        """What the next class in the MRO saves (the stream position), and the manifest version trained on."""
        return {**super().state_dict(), "manifest_version": self.manifest_version}  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the stream position, and the manifest version the checkpoint pins (checked against
        the cache at setup, or now when setup already ran, as Lightning does before restoring)."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
        pinned = state_dict.get("manifest_version")
        if isinstance(pinned, str) and pinned:
            self._pinned_manifest = pinned
            if self.manifest_version is not None:
                self._check_pinned()
