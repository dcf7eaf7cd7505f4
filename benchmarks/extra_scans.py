"""Real brain scans from other people than the MNI template, as an extra unlabelled archive.

The transfer benchmark pretrains on one template's planes (~120): MAE is data-hungry, and the
literature's first lever is more unlabelled scans. This writes the real brain scans that install
offline into one folder of NIfTI files, which ``benchmarks/transfer.py --extra-unlabelled DIR`` adds
to its pretraining archive (never to fine-tuning or scoring):

- ``pydeface``: the mean T1 head shipped in the pydeface 2.1.0 wheel (``pydeface/data/
  mean_reg2mean.nii.gz``; 176 x 256 x 256 at ~1 mm, skull and face on). Install it without its
  dependencies: ``pip install --no-deps pydeface==2.1.0``.
- ``colin27``: the Colin 27 brain (one person scanned 27 times and averaged; skull-stripped, ``ch2bet.nii.gz``,
  181 x 217 x 181 at 1 mm in MNI space), from Debian's ``mricron-data`` package
  (``apt-get install mricron-data``: ``/usr/share/mricron/templates``; or ``apt-get download`` and
  ``dpkg-deb -x``). Skull-stripped like the MNI template, so the closest in kind.
- ``pyradiomics``: two post-contrast T1 brain MRIs with tumours (``data/brain1_image.nrrd``,
  ``brain2_image.nrrd``; 256 x 256 x 25 and x 23 axial planes, 0.78 mm in plane, 6.5 mm apart) from
  the pyradiomics 3.0.1 source archive, which does not build here: fetch it with
  ``pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1`` and pass the
  ``.tar.gz``. NRRD is read with pynrrd (``pip install pynrrd``) and written as NIfTI, because prep
  reads DICOM and NIfTI.

``--axes all`` also writes each isotropic scan's coronal and sagittal planes as separate files, their
planes stacked along the file's third axis with a plain diagonal affine. That is a benchmark-only way
to put planes from all three axes into an axial-only pretraining run; the pyradiomics scans (6.5 mm
between planes) give axial planes only, as ``data.selection.max_anisotropy`` would have it.

    python benchmarks/extra_scans.py OUT --pyradiomics pyradiomics-3.0.1.tar.gz [--axes all]
    python benchmarks/extra_scans.py OUT --no-pydeface --colin27 /usr/share/mricron/templates --axes all
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

#: largest ratio of a scan's coarsest to finest voxel spacing for which its other axes are written too
ISOTROPIC = 1.5


#: where Debian's mricron-data puts the Colin 27 brain
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


def colin27_brain(folder: Path) -> Path:
    """The skull-stripped Colin 27 brain in an mricron-data templates folder."""
    path = Path(folder) / "ch2bet.nii.gz"
    if not path.is_file():
        raise SystemExit(f"no ch2bet.nii.gz in {folder}: apt-get install mricron-data (or pass its templates folder)")
    return path


def pydeface_head() -> Path:
    """The mean head in the installed pydeface package (found without importing it: its deps may be absent)."""
    spec = importlib.util.find_spec("pydeface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pydeface is not installed: pip install --no-deps pydeface==2.1.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mean_reg2mean.nii.gz"
    if not path.is_file():
        raise SystemExit(f"pydeface has no {path.name}: this needs the 2.1.0 wheel")
    return path


def nrrd_to_nifti(raw: bytes) -> nib.Nifti1Image:
    """One NRRD file (LPS space, as pyradiomics' are) as a NIfTI image in RAS."""
    import nrrd  # pynrrd: only this source needs it

    handle = io.BytesIO(raw)
    header = nrrd.read_header(handle)
    data = nrrd.read_data(header, handle)  # the same handle: pynrrd reads on from where the header ended
    if header.get("space") != "left-posterior-superior":
        raise ValueError(f"unsupported NRRD space {header.get('space')!r}")
    return nib.Nifti1Image(np.asarray(data), lps_to_ras_affine(header["space directions"], header["space origin"]))


def lps_to_ras_affine(directions: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """NIfTI affine (RAS world) of NRRD ``space directions`` (one row per array axis) and origin in LPS."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, dtype=float).T
    affine[:3, 3] = np.asarray(origin, dtype=float)
    affine[:2] *= -1  # L -> R and P -> A: the world's first two coordinates change sign
    return affine


def pyradiomics_brains(tarball: Path) -> list[tuple[str, nib.Nifti1Image]]:
    """``brain1`` and ``brain2`` from the pyradiomics source archive."""
    out = []
    with tarfile.open(tarball) as tar:
        for name in ("brain1", "brain2"):
            member = next((m for m in tar.getmembers() if m.name.endswith(f"data/{name}_image.nrrd")), None)
            if member is None:
                raise SystemExit(f"{tarball.name} holds no data/{name}_image.nrrd: is it pyradiomics 3.0.1?")
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            out.append((f"pyradiomics_{name}", nrrd_to_nifti(raw)))
    return out


def other_axes(name: str, img: nib.Nifti1Image) -> list[tuple[str, nib.Nifti1Image]]:
    """The scan's coronal and sagittal planes, each stacked along the file's third axis (diagonal affine)."""
    canonical = nib.as_closest_canonical(img)
    data, zooms = np.asarray(canonical.dataobj), canonical.header.get_zooms()[:3]
    if max(zooms) / min(zooms) > ISOTROPIC:
        return []
    coronal = np.transpose(data, (0, 2, 1))  # (x, z, y): planes along y, rows along z
    sagittal = np.transpose(data, (1, 2, 0))  # (y, z, x): planes along x
    return [
        (f"{name}_coronal", nib.Nifti1Image(coronal, np.diag([zooms[0], zooms[2], zooms[1], 1.0]))),
        (f"{name}_sagittal", nib.Nifti1Image(sagittal, np.diag([zooms[1], zooms[2], zooms[0], 1.0]))),
    ]


def write_extra_scans(
    out: Path, pyradiomics: Path | None, use_pydeface: bool = True, axes: str = "axial", colin27: Path | None = None
) -> list[Path]:
    """Write every requested source (and with ``axes="all"`` its other planes) under ``out``."""
    scans: list[tuple[str, nib.Nifti1Image]] = []
    if colin27 is not None:
        scans.append(("colin27_brain", nib.load(str(colin27_brain(colin27)))))
    if use_pydeface:
        scans.append(("pydeface_mean_head", nib.load(str(pydeface_head()))))
    if pyradiomics is not None:
        scans += pyradiomics_brains(pyradiomics)
    if axes == "all":
        scans += [extra for name, img in list(scans) for extra in other_axes(name, img)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img in scans:
        path = out / f"{name}.nii.gz"
        nib.save(img, str(path))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pyradiomics", type=Path, default=None, help="the pyradiomics-3.0.1.tar.gz source archive")
    parser.add_argument("--no-pydeface", action="store_true", help="leave out pydeface's mean head")
    parser.add_argument(
        "--colin27", type=Path, default=None, help=f"an mricron-data templates folder (installed: {MRICRON_TEMPLATES})"
    )
    parser.add_argument("--axes", choices=("axial", "all"), default="axial")
    args = parser.parse_args(argv)
    for path in write_extra_scans(args.out, args.pyradiomics, not args.no_pydeface, args.axes, args.colin27):
        img = nib.load(str(path))
        print(f"{path.name}: {img.shape}, {tuple(round(float(z), 2) for z in img.header.get_zooms()[:3])} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
