"""docs/data_prep.md documents every reason code, with the wording of data_prep.reasons."""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.reasons import DESCRIPTIONS, Reason

DOC = Path(__file__).resolve().parents[2] / "docs" / "data_prep.md"


def test_every_reason_has_a_description_and_a_doc_row() -> None:
    assert set(DESCRIPTIONS) == set(Reason)
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", DOC.read_text(encoding="utf-8"), flags=re.M))
    for reason in Reason:
        assert rows.get(reason.value) == DESCRIPTIONS[reason], reason.value
