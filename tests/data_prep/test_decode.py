"""Modality LUT, MONOCHROME1 and the dtype policy (HU or not)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.decode import NonFiniteValues, StackAssembler, compact, modality_values, storage_dtype, store_values


def test_integer_rescale_stays_exact_integer() -> None:
    raw = np.array([[0, 1000, 4095]], dtype=np.uint16)
    v = modality_values(raw, 1.0, -1024.0)
    assert v.dtype.kind == "i" and v.tolist() == [[-1024, -24, 3071]]


def test_fractional_rescale_is_float() -> None:
    v = modality_values(np.array([[10, 20]], dtype=np.int16), 0.5, 1.25)
    assert v.dtype.kind == "f" and v.tolist() == [[6.25, 11.25]]


@pytest.mark.parametrize(
    ("bits", "signed", "slope", "intercept", "raw", "expected"),
    [
        (12, 0, 1, 0, [0, 1, 4095], [4095, 4094, 0]),  # higher stored = darker -> inverted
        (8, 0, 1, 0, [0, 255], [255, 0]),
        (12, 1, 1, 0, [-2048, 0, 2047], [2047, -1, -2048]),
        (12, 0, 2, 100, [0, 4095], [8290, 100]),  # range [100, 8290] kept
    ],
)
def test_monochrome1_inverts_within_the_header_range(bits, signed, slope, intercept, raw, expected) -> None:
    arr = np.array([raw], dtype=np.int16 if signed else np.uint16)
    v = modality_values(arr, slope, intercept, monochrome1=True, bits_stored=bits, pixel_representation=signed)
    assert v.tolist() == [expected]


@pytest.mark.parametrize(
    ("hu", "integral", "lo", "hi", "dtype"),
    [
        (True, True, -1024, 3071, "int16"),
        (True, True, 0, 40000, "float32"),  # HU beyond int16: float32 rather than a wrong int
        (True, True, 0, 200, "int16"),  # HU is never uint8
        (True, False, -1.5, 3.0, "float32"),
        (False, True, 0, 255, "uint8"),  # e.g. MR, or a CT secondary capture's display values
        (False, True, 0, 4095, "int16"),
        (False, True, 0, 65535, "uint16"),
        (False, True, -5, 70000, "float32"),
        (False, False, 0.0, 1.0, "float32"),
    ],
)
def test_storage_dtype_policy(hu, integral, lo, hi, dtype) -> None:
    assert storage_dtype(hu, integral, lo, hi) == np.dtype(dtype)


def test_store_values_follows_the_hu_decision_not_the_modality() -> None:
    values = np.array([[0.0, 10.0], [20.0, 200.0]])
    assert store_values(values, hu=True).dtype == np.int16
    assert store_values(values, hu=False).dtype == np.uint8
    assert store_values(values, "CT").dtype == np.int16  # callers that know only the modality


def test_non_finite_values_are_refused_not_cleaned() -> None:
    with pytest.raises(NonFiniteValues):
        compact(np.array([1.0, np.nan]))
    with pytest.raises(NonFiniteValues):
        store_values(np.array([1.0, np.inf]), hu=False)


def test_integer_valued_floats_are_stored_as_integers() -> None:
    assert store_values(np.array([[1.0, 2.0], [3.0, 250.0]]), hu=False).dtype == np.uint8


def test_stack_assembler_picks_one_dtype_for_all_slices() -> None:
    asm = StackAssembler()
    asm.add(np.array([[0, 10]], dtype=np.int64))
    asm.add(np.array([[0, 300]], dtype=np.int64))  # no longer fits uint8
    out = asm.finish(hu=False)
    assert out.dtype == np.int16 and out.tolist() == [[[0, 10]], [[0, 300]]]


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_a_modality_lut_is_applied_whichever_way_its_data_is_stored(vr: str) -> None:
    """LUTData may be multi-valued US or OW bytes (both are legal); prep read only the first and failed the
    series (build_failed) on the second. MONOCHROME1 inverts within the LUT's output range either way."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    table = (np.arange(256, dtype=np.uint16) * 3 + 10).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", vr, table.tobytes() if vr == "OW" else [int(v) for v in table])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # OW data is read in the file's byte order
    ds.ModalityLUTSequence = Sequence([item])
    ds.PixelRepresentation = 0
    ds.BitsStored = 8
    raw = np.array([[0, 1, 255]], dtype=np.uint16)
    assert modality_values(raw, 1.0, 0.0, lut_dataset=ds).tolist() == [[10, 13, 775]]
    inverted = modality_values(raw, 1.0, 0.0, lut_dataset=ds, monochrome1=True)
    assert inverted.tolist() == [[775, 772, 10]]  # lo + hi - v over the LUT's outputs [10, 775]
