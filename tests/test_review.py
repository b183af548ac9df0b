"""A reviewer's decisions (issue 43): read, checked, and the QC score measured against them (known answers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinecohort.review import DecisionsError, auc, ranking_check, read_decisions


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "decisions.tsv"
    path.write_text(text)
    return path


def test_decisions_are_read_with_an_optional_note_and_bad_rows_are_named(tmp_path: Path):
    table = read_decisions(write(tmp_path, "image_id\tdecision\na\taccept\nb\t Reject \n"))
    assert table.values.tolist() == [["a", "accept", ""], ["b", "reject", ""]]
    with pytest.raises(DecisionsError, match=r"row 3: decision 'maybe' is not one of accept, reject, fix; row 4: a is decided twice"):
        read_decisions(write(tmp_path, "image_id\tdecision\tnote\na\taccept\t\nb\tmaybe\t\na\treject\tcut\n"))
    with pytest.raises(DecisionsError, match="no column decision"):
        read_decisions(write(tmp_path, "image_id\tverdict\na\taccept\n"))


def test_the_auc_counts_pairs_and_ties_half():
    score = pd.Series({"a": 0.9, "b": 0.5, "c": 0.5, "d": 0.1})
    # bad a, c; good b, d: pairs (a>b 1, a>d 1, c=b 0.5, c>d 1) -> 3.5 / 4
    assert auc(score, pd.Series({"a": True, "b": False, "c": True, "d": False})) == 0.875
    assert np.isnan(auc(score, pd.Series({"a": True, "b": True})))


def test_ranking_check_on_a_constructed_cohort():
    """20 images, score 20..1 (worst first): deciles of two. Reviewed: the top six and two at the bottom. Rejected:
    images 1, 2, 4 (of the top) and 19; accepted: 3, 5, 6 and 20; image 7 'fix' is not a review of the ranking."""
    score = pd.Series({f"i{k:02d}": float(21 - k) for k in range(1, 21)})
    decisions = pd.DataFrame({"image_id": ["i01", "i02", "i03", "i04", "i05", "i06", "i07", "i19", "i20"],
                              "decision": ["reject", "reject", "accept", "reject", "accept", "accept", "fix", "reject", "accept"],
                              "note": ""})  # fmt: skip
    area, deciles = ranking_check(score, decisions)
    # rejected scores 20, 19, 17, 2 against accepted 18, 16, 15, 1: 20 beats 4, 19 beats 4, 17 beats 3, 2 beats 1
    assert area == 12 / 16
    assert deciles.images.tolist() == [2] * 10
    assert deciles.reviewed.tolist() == [2, 2, 2, 0, 0, 0, 0, 0, 0, 2]
    assert deciles.rejected.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert deciles.rejection_rate.tolist()[:3] == [1.0, 0.5, 0.0] and deciles.rejection_rate.isna().sum() == 6
    assert deciles.rejection_rate.iloc[-1] == 0.5
