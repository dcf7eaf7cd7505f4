"""data_prep: from a messy hospital archive to the validated, de-identified training cache.

    from data_prep import prep_archive
    summary = prep_archive([Path("/archive")], Path("/data/cache"), workers=8)

Stages, one module each: ``walk`` (folders and links -> files, DICOM sniffed by content),
``headers`` (classic / enhanced DICOM header -> header record), ``scan`` (files -> header records,
in a pool), ``compact`` (one shared copy of the values a series repeats, so a million records fit),
``nifti_meta`` (a NIfTI's JSON sidecar and modality), ``series`` (records -> validated series
plans), ``decode`` (pixels -> stored values), ``geometry`` (ordering, affines, canonical
orientation), ``deid`` (keyed pseudonyms, salt), ``build`` (plan -> cache entry, resumable),
``state`` (per-series state and the removal journal), ``incremental`` (fingerprints: what a rerun
rebuilds, keeps or removes), ``publish`` (reject report, atomic manifest swap, removals),
``shards`` and ``path_map``, ``preflight`` (every check before anything is written), ``report``
(reject report, shard results, summary), ``pipeline`` (the run, as named steps), ``pool`` (process
pools that die with their parent), ``workers`` (the crash-proof build supervisor), ``sources``
(DICOMweb and DIMSE PACS), ``cli``. Reason codes: ``reasons``. User documentation: docs/data_prep.md.
"""

from data_prep.pipeline import PrepError, merge_shards, prep_archive
from data_prep.reasons import DESCRIPTIONS, Reason
from data_prep.report import PrepSummary

__all__ = ["DESCRIPTIONS", "PrepError", "PrepSummary", "Reason", "merge_shards", "prep_archive"]
