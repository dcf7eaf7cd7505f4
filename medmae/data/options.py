"""The grouped options of :class:`~medmae.data.CacheDataModule`: one validated, frozen dataclass per concern.

A config names each group as a section under ``data`` (LightningCLI reads them from YAML)::

    data:
      cache_dir: cache
      img_size: [224, 224]
      selection: {modalities: [CT], min_size: 64}
      sampling: {samples_per_epoch: 32000}
      crop: {crop_scale: [0.2, 1.0], hflip_prob: 0.5}
      intensity: {ct_windows: [[40, 400], [-600, 1500]], ct_window_mode: random}
      foreground: {foreground_fraction: 0.2}
      loader: {pin_memory: true, prefetch_factor: 2}
      augment: {rotate_deg: 15, scale: [0.87, 1.15], gamma: [0.71, 1.4], bias_field: 0.05}

Every dataclass checks itself when built, so a bad value stops with one line that names the full
key (``data.crop.crop_scale must ...``) whether it came from YAML, the command line or Python.
Field names are the old flat names, so an old flat config moves over by adding the section:
:data:`LEGACY_KEYS` is that table, and :func:`migrate_legacy` applies it (with a deprecation
message per key) for the CLI and for ``CacheDataModule(**old_kwargs)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from medmae.data.cache import PERCENTILES
from medmae.data.intensity import CT_WINDOW_MODES, DEFAULT_CT_WINDOWS, IntensityRule, number, pair

#: resize interpolations (as ``medmae.data.transforms.INTERPOLATIONS``; not imported: it pulls in torch)
INTERPOLATIONS = ("bilinear", "bicubic")


def int_at_least(value: Any, field: str, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool); else a one-line ValueError naming ``field``."""
    return _int(value, field, minimum)


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")
    return value


def _optional_int(value: Any, field: str, minimum: int) -> int | None:
    return None if value is None else _int(value, field, minimum)


def _set(obj: object, **values: Any) -> None:
    """Store normalised values on a frozen dataclass (from its ``__post_init__``)."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class SelectionOptions:
    """``data.selection``: which cached series a 2D / 2.5D run uses (3D uses ``modalities`` only).

    Args:
        modalities: modality codes to use (e.g. ``["CT", "MR"]``, any case), or ``None`` for all.
        min_size: smallest plane height/width in pixels; smaller series are dropped.
        min_slices: smallest number of planes of a volume along ``data.axis``; images are exempt.
        include_images: use single 2D images (kind ``image``: CR/DX/MG...).
        max_anisotropy: largest plane pixel-spacing ratio of a volume along ``data.axis``.
    """

    modalities: Sequence[str] | None = None
    min_size: int = 32
    min_slices: int = 1
    include_images: bool = True
    max_anisotropy: float = 1.5

    def __post_init__(self) -> None:
        m = self.modalities
        if m is not None and (isinstance(m, str) or not m or not all(isinstance(x, str) and x for x in m)):
            raise ValueError(f"data.selection.modalities must be a non-empty list of modality codes or null, got {m!r}")
        _int(self.min_size, "data.selection.min_size", 1)
        _int(self.min_slices, "data.selection.min_slices", 1)
        if not number(self.max_anisotropy, "data.selection.max_anisotropy") >= 1.0:
            raise ValueError(f"data.selection.max_anisotropy must be >= 1, got {self.max_anisotropy!r}")
        _set(
            self,
            modalities=None if m is None else tuple(sorted({x.upper() for x in m})),
            include_images=bool(self.include_images),
            max_anisotropy=float(self.max_anisotropy),
        )


@dataclass(frozen=True)
class SamplingOptions:
    """``data.sampling``: how training and validation positions are drawn.

    Args:
        sampling_alpha: series weight ``n_slices ** alpha`` (3D: physical volume), slices equal within
            a series (0 = every series equal, 1 = every slice equal).
        samples_per_epoch: training samples per epoch over all devices (>= ``data.batch_size``);
            default: the number of indexed training slices, at least one full batch per device.
        val_samples: ``None`` = every indexed validation slice once, in order; an int = that many
            positions drawn once by the sampling policy (fixed seed).
    """

    sampling_alpha: float = 0.5
    samples_per_epoch: int | None = None
    val_samples: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= number(self.sampling_alpha, "data.sampling.sampling_alpha") <= 1.0:
            raise ValueError(f"data.sampling.sampling_alpha must be in [0, 1], got {self.sampling_alpha!r}")
        _optional_int(self.samples_per_epoch, "data.sampling.samples_per_epoch", 1)
        _optional_int(self.val_samples, "data.sampling.val_samples", 1)
        _set(self, sampling_alpha=float(self.sampling_alpha))


@dataclass(frozen=True)
class CropOptions:
    """``data.crop``: the 2D random-resized crop, flip and resize (3D crops: ``data.volume``).

    Args:
        crop_scale: crop area fraction range, ``0 < low <= high <= 1`` (MAE: 0.2-1.0).
        crop_ratio: crop aspect range relative to the output aspect, ``0 < low <= high`` (MAE: 3/4-4/3).
        hflip_prob: probability of a left-right flip of a training crop (0 disables).
        interpolation: ``"bilinear"`` (default) or ``"bicubic"`` (as MAE's torchvision pipeline;
            ~0.25 ms more per sample at 224²).
        antialias: antialias when downscaling.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        s_lo, s_hi = pair(self.crop_scale, "data.crop.crop_scale")
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise ValueError(f"data.crop.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        r_lo, r_hi = pair(self.crop_ratio, "data.crop.crop_ratio")
        if not (0.0 < r_lo <= r_hi and math.isfinite(r_hi)):
            raise ValueError(f"data.crop.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio!r}")
        if not 0.0 <= number(self.hflip_prob, "data.crop.hflip_prob") <= 1.0:
            raise ValueError(f"data.crop.hflip_prob must be in [0, 1], got {self.hflip_prob!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.crop.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        _set(
            self,
            crop_scale=(s_lo, s_hi),
            crop_ratio=(r_lo, r_hi),
            hflip_prob=float(self.hflip_prob),
            antialias=bool(self.antialias),
        )


@dataclass(frozen=True)
class IntensityOptions:
    """``data.intensity``: stored values -> [0, 1] (CT windows in HU, stored percentiles otherwise).

    Args:
        ct_windows: CT windows as ``[level, width]`` in HU (default soft tissue, lung, bone).
        ct_window_mode: ``"random"`` (one window per sample; one listed window = fixed window) or
            ``"channels"`` (all windows as channels; non-CT series repeat their image per window).
        ct_inference_window: index into ``ct_windows`` of the fixed window fine-tuning and inference
            use in ``"random"`` mode (written to the card; pretraining still draws at random).
        percentiles: stored percentiles mapped to 0 and 1 for non-HU series (MR, X-ray, ...).
    """

    ct_windows: tuple[tuple[float, float], ...] = DEFAULT_CT_WINDOWS
    ct_window_mode: str = "random"
    ct_inference_window: int = 0
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if isinstance(self.ct_windows, str) or not isinstance(self.ct_windows, Sequence):
            msg = f"data.intensity.ct_windows must be a list of [level, width] pairs, got {self.ct_windows!r}"
            raise ValueError(msg)
        windows = tuple(pair(w, "data.intensity.ct_windows entry") for w in self.ct_windows)
        if not windows or any(not (math.isfinite(lv) and math.isfinite(wd) and wd > 0) for lv, wd in windows):
            raise ValueError(
                "data.intensity.ct_windows must be a non-empty list of (level, width) pairs with width > 0, "
                f"got {self.ct_windows!r}"
            )
        if self.ct_window_mode not in CT_WINDOW_MODES:
            raise ValueError(
                f"data.intensity.ct_window_mode must be one of {CT_WINDOW_MODES}, got {self.ct_window_mode!r}"
            )
        w = self.ct_inference_window
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < len(windows):
            raise ValueError(
                f"data.intensity.ct_inference_window must index ct_windows (0..{len(windows) - 1}), got {w!r}"
            )
        p_lo, p_hi = pair(self.percentiles, "data.intensity.percentiles")
        if p_lo not in PERCENTILES or p_hi not in PERCENTILES or not p_lo < p_hi:
            raise ValueError(
                f"data.intensity.percentiles must be two increasing values from the cache's stored {PERCENTILES}, "
                f"got {self.percentiles!r}"
            )
        _set(self, ct_windows=windows, percentiles=(p_lo, p_hi))

    def rule(self, foreground: ForegroundOptions) -> IntensityRule:
        """The intensity and foreground rule slices and volumes share (``medmae.data.intensity``)."""
        f = foreground
        return IntensityRule.checked(
            self.ct_windows, self.ct_window_mode, self.ct_inference_window, self.percentiles,
            f.foreground_fraction, f.foreground_hu, f.foreground_level,
        )  # fmt: skip


@dataclass(frozen=True)
class ForegroundOptions:
    """``data.foreground``: replace background crops (2D: the crop's centre slice; 3D: the crop).

    Args:
        foreground_fraction: minimum fraction of foreground pixels in a crop; crops below it are
            replaced (up to ``foreground_tries`` times). 0 disables the filter.
        foreground_hu: CT foreground threshold in HU (air is -1000, fat about -100).
        foreground_level: non-CT foreground threshold as a fraction of the percentile range.
        foreground_tries: most background crops replaced per sample.
    """

    foreground_fraction: float = 0.0
    foreground_hu: float = -500.0
    foreground_level: float = 0.1
    foreground_tries: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= number(self.foreground_fraction, "data.foreground.foreground_fraction") < 1.0:
            raise ValueError(f"data.foreground.foreground_fraction must be in [0, 1), got {self.foreground_fraction!r}")
        number(self.foreground_hu, "data.foreground.foreground_hu")
        if not 0.0 <= number(self.foreground_level, "data.foreground.foreground_level") < 1.0:
            raise ValueError(f"data.foreground.foreground_level must be in [0, 1), got {self.foreground_level!r}")
        _int(self.foreground_tries, "data.foreground.foreground_tries", 0)
        _set(
            self,
            foreground_fraction=float(self.foreground_fraction),
            foreground_hu=float(self.foreground_hu),
            foreground_level=float(self.foreground_level),
        )


@dataclass(frozen=True)
class LoaderOptions:
    """``data.loader``: how batches are loaded and moved (never what they hold: batches are the same).

    Args:
        pin_memory: pin batches in page-locked memory (only when CUDA is available); Lightning then
            copies them to the device without blocking.
        device_transforms: the GPU data path (``medmae.data.device_path``): workers only read crops,
            the device flips, resizes and scales them per batch. ``null`` (default): on when training
            on CUDA, off on CPU. Same values either way; 2D only.
        persistent_workers: keep workers alive between epochs (only when ``data.num_workers > 0``).
        prefetch_factor: batches prefetched per worker (only when ``data.num_workers > 0``).
        max_open_files: memory-mapped series kept open per worker.
        verify_on_setup: open every selected array's header at setup and drop unreadable entries.
    """

    pin_memory: bool = True
    device_transforms: bool | None = None
    persistent_workers: bool = True
    prefetch_factor: int = 2
    max_open_files: int = 64
    verify_on_setup: bool = True

    def __post_init__(self) -> None:
        if self.device_transforms is not None and not isinstance(self.device_transforms, bool):
            raise ValueError(
                f"data.loader.device_transforms must be true, false or null (auto), got {self.device_transforms!r}"
            )
        _int(self.prefetch_factor, "data.loader.prefetch_factor", 1)
        _int(self.max_open_files, "data.loader.max_open_files", 1)
        _set(
            self,
            pin_memory=bool(self.pin_memory),
            persistent_workers=bool(self.persistent_workers),
            verify_on_setup=bool(self.verify_on_setup),
        )


@dataclass(frozen=True)
class AugmentOptions:
    """``data.augment``: random rotation, zoom, bias field and gamma of 2D pretraining crops (all off by default).

    Applied to training batches after intensity scaling (:class:`~medmae.data.augment.PlaneAugment`,
    which documents the order and the seeding); never to validation or at inference. 2D / 2.5D only.

    Args:
        rotate_deg: largest in-plane rotation in degrees (uniform in ``±rotate_deg``), in [0, 180].
        scale: zoom range ``0 < low <= high`` (log-uniform; > 1 enlarges the anatomy).
        gamma: gamma range ``0 < low <= high`` (log-uniform; ``image ** gamma`` on [0, 1]).
        bias_field: coefficient bound of the degree-2 log bias field, in [0, 1] (0.05: the field stays
            within a factor 0.80-1.24 across the image, usually much closer to 1).
    """

    rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)
    bias_field: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= number(self.rotate_deg, "data.augment.rotate_deg") <= 180.0:
            raise ValueError(f"data.augment.rotate_deg must be in [0, 180], got {self.rotate_deg!r}")
        ranges = {}
        for name in ("scale", "gamma"):
            lo, hi = pair(getattr(self, name), f"data.augment.{name}")
            if not (0.0 < lo <= hi and math.isfinite(hi)):
                raise ValueError(f"data.augment.{name} must satisfy 0 < low <= high, got {getattr(self, name)!r}")
            ranges[name] = (lo, hi)
        if not 0.0 <= number(self.bias_field, "data.augment.bias_field") <= 1.0:
            raise ValueError(f"data.augment.bias_field must be in [0, 1], got {self.bias_field!r}")
        _set(self, rotate_deg=float(self.rotate_deg), bias_field=float(self.bias_field), **ranges)

    @property
    def geometric(self) -> bool:
        """Whether images are rotated or zoomed (a label plane then has to follow)."""
        return self.rotate_deg > 0 or self.scale != (1.0, 1.0)

    @property
    def active(self) -> bool:
        """Whether any change is made to a training batch."""
        return self.geometric or self.bias_field > 0 or self.gamma != (1.0, 1.0)


#: the sections of ``data`` and their dataclass (the ``CacheDataModule`` argument of the same name)
SECTIONS: dict[str, type] = {
    "selection": SelectionOptions,
    "sampling": SamplingOptions,
    "crop": CropOptions,
    "intensity": IntensityOptions,
    "foreground": ForegroundOptions,
    "loader": LoaderOptions,
    "augment": AugmentOptions,
}

#: old flat ``data.<name>`` keys (before issue 19) -> their dotted path under ``data``
LEGACY_KEYS: dict[str, str] = {
    name: f"{section}.{name}"
    for section, cls in SECTIONS.items()
    if section != "augment"  # new with its section: it never had flat keys
    for name in cls.__dataclass_fields__
}


# the sections' defaults: one shared frozen object each, the ``CacheDataModule`` signature's defaults
DEFAULT_SELECTION = SelectionOptions()
DEFAULT_SAMPLING = SamplingOptions()
DEFAULT_CROP = CropOptions()
DEFAULT_INTENSITY = IntensityOptions()
DEFAULT_FOREGROUND = ForegroundOptions()
DEFAULT_LOADER = LoaderOptions()
DEFAULT_AUGMENT = AugmentOptions()


def sections(given: Mapping[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """The sections from ``CacheDataModule``'s arguments: ``given`` (section name -> dataclass or
    mapping) with the old flat keyword arguments ``legacy`` moved in (``DeprecationWarning`` each)."""
    unknown = sorted(set(legacy) - set(LEGACY_KEYS))
    if unknown:
        raise TypeError(f"CacheDataModule got an unexpected keyword argument {unknown[0]!r}")
    merged = migrate_legacy({**given, **legacy}, warn=_warn_caller) if legacy else dict(given)
    return {name: section(merged[name], name) for name in SECTIONS}


def _warn_caller(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=5)  # the caller of CacheDataModule(...)


def section(value: Any, name: str) -> Any:
    """``value`` as the dataclass of section ``name``; a mapping of its fields is accepted (Python callers)."""
    cls = SECTIONS[name]
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            known = ", ".join(cls.__dataclass_fields__)
            raise ValueError(f"data.{name} has no option {unknown[0]!r} (options: {known})")
        return cls(**value)
    raise ValueError(f"data.{name} must be a {cls.__name__} section, got {value!r}")


def _warn(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=4)


def migrate_legacy(
    options: Mapping[str, Any],
    table: Mapping[str, str] = LEGACY_KEYS,
    prefix: str = "data",
    warn: Callable[[str], None] = _warn,
) -> dict[str, Any]:
    """``options`` (one config section, e.g. ``data``) with every old flat key of ``table`` moved to its
    nested place, and one ``warn("<prefix>.<old> is deprecated: use <prefix>.<new>")`` per moved key.

    Used by the CLI before jsonargparse parses a config (so old YAML still loads) and by
    ``CacheDataModule(**old_kwargs)``. A LightningCLI ``init_args`` level is migrated inside. Giving
    a key both ways (old flat and new nested) is a ``ValueError``: which one was meant is unknown.
    """
    if isinstance(options.get("init_args"), Mapping):
        return {**options, "init_args": migrate_legacy(options["init_args"], table, prefix, warn)}
    out = {key: value for key, value in options.items() if key not in table}
    for old in (key for key in options if key in table):
        new = table[old]
        *parents, leaf = new.split(".")
        if _given(options, new):
            raise ValueError(f"{prefix}.{old} and {prefix}.{new} are both given: keep {prefix}.{new} only")
        node = out
        for part in parents:
            child = node.get(part)
            if child is None:
                child = {}
            elif is_dataclass(child) and not isinstance(child, type):  # Python: an old kwarg overrides its field
                child = {f.name: getattr(child, f.name) for f in fields(child)}
            elif isinstance(child, Mapping):
                child = dict(child)
            else:
                raise ValueError(f"{prefix}.{part} must be a section (a mapping), got {child!r}")
            node[part] = child
            node = child
        node[leaf] = options[old]
        warn(f"{prefix}.{old} is deprecated: use {prefix}.{new}")
    for key, given in options.items():  # a section given as an options object stays one, its fields overridden
        if is_dataclass(given) and not isinstance(given, type) and isinstance(out.get(key), dict):
            out[key] = replace(given, **out[key])
    return out


def _given(options: Mapping[str, Any], dotted: str) -> bool:
    """Whether ``options`` sets the nested key ``dotted`` through mappings (not through a dataclass default)."""
    node: Any = options
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True
