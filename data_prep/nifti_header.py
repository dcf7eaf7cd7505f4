"""A NIfTI header read from its fixed-size block only, never its extensions.

``nib.load`` reads every header extension whole (a ``.nii.gz`` can claim gigabytes of them); here only
the fixed header (348 bytes, NIfTI-2: 540) is read, and the data is later read from ``vox_offset``.
"""

from __future__ import annotations

from typing import Any

#: NIfTI header sizes (``sizeof_hdr``) of NIfTI-1 and NIfTI-2.
NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
#: NIfTI intent codes 3000-3099 are CIFTI matrices (connectivity, parcels, ...), not images.
_CIFTI_INTENTS = range(3000, 3100)


def read_nifti_header(path: str) -> Any:
    """A NIfTI-1 or NIfTI-2 header read from its fixed-size block only (never its extensions).

    The file is opened as nibabel opens it (``ImageOpener``: ``.gz`` by name), so of a ``.nii.gz``
    only the first 540 bytes are inflated. Returns a nibabel ``Nifti1Header`` / ``Nifti2Header``
    built from those bytes, checked as ``nib.load`` checks it, with no extensions.

    Raises:
        ValueError: not a NIfTI-1/2 header, or one nibabel refuses (its ``HeaderDataError`` is a ValueError).
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as f:  # the opener nibabel's array proxy reads the voxels with
        block = f.read(NIFTI2_HEADER_BYTES)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        if klass.may_contain_header(block):
            return klass(block[: klass.sizeof_hdr], check=True)
    raise ValueError(f"not a NIfTI header (sizeof_hdr is neither {NIFTI1_HEADER_BYTES} nor {NIFTI2_HEADER_BYTES})")


def is_cifti(header: Any) -> bool:
    """A CIFTI matrix (intent codes 3000-3099), not an image."""
    return int(header["intent_code"]) in _CIFTI_INTENTS
