"""Reject reason codes: the one place they are defined.

Every input file ends either in a built series or in the reject report with exactly one of these
codes; docs/data_prep.md renders :data:`DESCRIPTIONS` as its table, and a test keeps the two in sync.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a file (or an unreadable folder) did not end up in a built series."""

    # -- file level (scan)
    EMPTY_FILE = "empty_file"
    UNREADABLE_FILE = "unreadable_file"
    UNREADABLE_DIRECTORY = "unreadable_directory"
    DIRECTORY_LINK = "directory_link"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    NOT_RECOGNISED = "not_recognised"
    DICOMDIR = "dicomdir"
    DICOM_UNREADABLE = "dicom_unreadable"
    NON_IMAGE_SOP = "non_image_sop"
    NO_PIXEL_DATA = "no_pixel_data"
    LOCALIZER = "localizer"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    SECONDARY_CAPTURE = "secondary_capture"
    COLOR_IMAGE = "color_image"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    MULTIFRAME_WITHOUT_GEOMETRY = "multiframe_without_geometry"
    MOSAIC = "mosaic"
    TOO_LARGE = "too_large"
    SIZE_MISMATCH = "size_mismatch"
    NIFTI_UNREADABLE = "nifti_unreadable"
    UNSUPPORTED_NIFTI = "unsupported_nifti"
    SIDECAR_OF_REJECTED_NIFTI = "sidecar_of_rejected_nifti"
    # -- series assembly
    DUPLICATE_INSTANCE = "duplicate_instance"
    MISSING_GEOMETRY = "missing_geometry"
    OVERLAPPING_SLICES = "overlapping_slices"
    MISSING_SLICES = "missing_slices"
    UNEVEN_SPACING = "uneven_spacing"
    GANTRY_TILT = "gantry_tilt"
    # -- build (decode)
    PIXEL_DECODE_FAILED = "pixel_decode_failed"
    NON_FINITE_VALUES = "non_finite_values"
    BUILD_FAILED = "build_failed"
    SERIES_TIMEOUT = "series_timeout"
    # -- PACS sources (data_prep.sources)
    PACS_UNREACHABLE = "pacs_unreachable"
    PACS_RETRIEVE_FAILED = "pacs_retrieve_failed"

    def __str__(self) -> str:  # so f-strings and JSON keys show the code, not the member name
        return self.value


DESCRIPTIONS: dict[Reason, str] = {
    Reason.EMPTY_FILE: "zero-byte file",
    Reason.UNREADABLE_FILE: "the file could not be opened or read (permission denied, I/O error, broken link)",
    Reason.UNREADABLE_DIRECTORY: "a folder could not be listed; its id stands for everything inside it",
    Reason.DIRECTORY_LINK: "a symbolic link to a folder that was not followed (inside an archive: its target is "
    "scanned under its own path; outside: only with `--follow-links`; or a folder already scanned, e.g. a link "
    "loop); its id stands for everything behind it",
    Reason.NOT_A_REGULAR_FILE: "a FIFO, socket or device node: never opened",
    Reason.NOT_RECOGNISED: "neither DICOM (by content) nor NIfTI (`.nii` / `.nii.gz`) nor a NIfTI's JSON sidecar: "
    "text, junk, other formats, a `.json` with no NIfTI of its stem beside it",
    Reason.DICOMDIR: "a DICOMDIR media index (by name or Media Storage Directory SOP class); holds no image",
    Reason.DICOM_UNREADABLE: "looks like DICOM but its header cannot be parsed",
    Reason.NON_IMAGE_SOP: "a non-image object: SR, RT plan/struct/dose/record, presentation state, KO, "
    "waveform, encapsulated document, segmentation, registration, raw data, ...",
    Reason.NO_PIXEL_DATA: "an image-like header without Rows/Columns (or without any SOP class and image)",
    Reason.LOCALIZER: "ImageType contains LOCALIZER or SCOUT (scanogram / survey images)",
    Reason.BURNED_IN_ANNOTATION: "BurnedInAnnotation is YES: text (possibly names) drawn into the pixels",
    Reason.SECONDARY_CAPTURE: "a Secondary Capture SOP class, or ImageType starting DERIVED, SECONDARY (screenshots, "
    "reformats: often text drawn into the pixels), without BurnedInAnnotation = NO; kept with `--allow-secondary`",
    Reason.COLOR_IMAGE: "colour pixels (SamplesPerPixel > 1, RGB/YBR*/PALETTE COLOR); pretraining is grayscale",
    Reason.UNSUPPORTED_PIXEL_FORMAT: "a pixel layout we do not store (1-bit pixels)",
    Reason.MULTIFRAME_WITHOUT_GEOMETRY: "a multi-frame file without per-frame geometry (cine loops, NM frames)",
    Reason.MOSAIC: "a Siemens MOSAIC image (ImageType MOSAIC: many slices tiled in one picture); not demosaiced",
    Reason.TOO_LARGE: "declares more voxels than `--max-voxels` allows (Rows x Columns x frames of a file, the "
    "first volume of a NIfTI, or a whole series), or holds more than its image needs: a deflated DICOM whose "
    "data inflates past its declared pixel bytes + 64 MiB, a NIfTI whose voxels start more than 64 MiB in; "
    "rejected before anything is decoded",
    Reason.SIZE_MISMATCH: "the file contradicts itself about the image size (NumberOfFrames larger than its "
    "per-frame entries; a JPEG, JPEG-LS or JPEG 2000 codestream whose width, height or components differ from "
    "Columns, Rows, SamplesPerPixel); rejected before anything is decoded",
    Reason.NIFTI_UNREADABLE: "a `.nii`/`.nii.gz` whose header nibabel cannot read",
    Reason.UNSUPPORTED_NIFTI: "a NIfTI that is not a 2D/3D/4D scalar image (CIFTI matrices, > 4 non-trivial "
    "dims, complex values, singular affine)",
    Reason.SIDECAR_OF_REJECTED_NIFTI: "a JSON sidecar (`<stem>.json`) whose NIfTI was rejected by the scan; the NIfTI "
    "is counted under its own reason (a sidecar whose NIfTI is rejected later shares the NIfTI's reason)",
    Reason.DUPLICATE_INSTANCE: "same SOPInstanceUID as a file already kept (first by archive path wins)",
    Reason.MISSING_GEOMETRY: "a multi-image cross-sectional series whose images lack position/orientation",
    Reason.OVERLAPPING_SLICES: "two slices of one stack at the same position that no DICOM tag tells apart",
    Reason.MISSING_SLICES: "a gap of more than 1.5x the median slice spacing (slices missing from the stack)",
    Reason.UNEVEN_SPACING: "a slice lies more than 10% of the slice spacing off the uniform grid",
    Reason.GANTRY_TILT: "slice positions drift in-plane by more than half a pixel (tilted or sheared stack)",
    Reason.PIXEL_DECODE_FAILED: "header reads but the pixel data does not decode (truncated or shorter than "
    "declared, corrupt, no decoder, the decoder raised, crashed or ran past `--decode-timeout`)",
    Reason.NON_FINITE_VALUES: "NaN or +/-Inf values as stored: after the rescale (a NaN or infinite "
    "RescaleSlope/RescaleIntercept included) and the cast to float32 (1e39 is infinite there); rejected, never "
    "silently cleaned",
    Reason.BUILD_FAILED: "an unexpected error while building the series (bug guard; nothing crashes)",
    Reason.SERIES_TIMEOUT: "building the series cost more than `--series-timeout` seconds of worker time over all "
    "its attempts (slow files, or one hanging file after another); its files not already `pixel_decode_failed`",
    Reason.PACS_UNREACHABLE: "the PACS stopped answering (refused, timed out, TLS failure; after every retry) while an "
    "instance of a series that passed the checks was pulled: the whole series is left unbuilt and the next run "
    "pulls it (a PACS unreachable while listing or reading metadata stops the run instead)",
    Reason.PACS_RETRIEVE_FAILED: "the PACS answered with an error (HTTP 4xx/5xx after the retries, a failed C-FIND, "
    "C-GET or C-MOVE, an unusable answer) or the per-series time budget ran out: for an instance pulled, the whole "
    "series is left unbuilt for the next run; for a series' metadata, the id stands for the whole series",
}
