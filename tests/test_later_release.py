"""The phantom's later release: new subjects, eids disjoint from every earlier release."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from biometry.phantom import cohort_eids, generate_cohort, subject_seed
from biometry.phantom import main as synth_main

SCALE = 0.2


def test_later_release_eids_are_disjoint_even_when_the_streams_collide():
    first = cohort_eids(500, 3)
    later = cohort_eids(500, 3, release=2, exclude=first)
    assert len(set(later)) == 500 and not set(later) & set(first)
    assert later != first[:500]
    assert subject_seed(3, 0, release=2) != subject_seed(3, 0)
    # exclusion holds by construction: excluding the later stream's own first draws skips them
    again = cohort_eids(5, 3, release=2, exclude=later[:3])
    assert again[:2] == later[3:5]
    assert cohort_eids(4, 3, release=1) == first[:4]  # release 1 unchanged
    with pytest.raises(ValueError, match="release must be >= 1"):
        cohort_eids(1, 3, release=0)


def test_generate_later_releases_chain(tmp_path):
    first = generate_cohort(tmp_path / "r1", 2, 5, scale=SCALE, progress=False)
    second = generate_cohort(tmp_path / "r2", 2, 5, scale=SCALE, progress=False,
                             later_release_of=first)
    # the CLI without --scale takes the earlier release's (it had to be repeated)
    assert synth_main(["--out", str(tmp_path / "r3"), "--subjects", "1", "--seed", "5",
                       "--no-progress", "--later-release-of", str(second)]) == 0
    eids = [set(pd.read_csv(tmp_path / r / "fields.csv", dtype={"eid": str})["eid"])
            for r in ("r1", "r2", "r3")]
    assert not eids[0] & eids[1] and not eids[2] & (eids[0] | eids[1])
    meta = json.loads((tmp_path / "r3" / "cohort.json").read_text())
    assert meta["release"] == 3 and set(meta["earlier_eids"]) == eids[0] | eids[1]
    assert meta["scale"] == SCALE
    # same protocol: a different scale is refused with one line naming the earlier folder
    with pytest.raises(ValueError, match=r"r1: the earlier release has scale 0.2, this one 0.3"):
        generate_cohort(tmp_path / "bad", 1, 5, scale=0.3, progress=False, later_release_of=first)
    with pytest.raises(ValueError, match="not a phantom cohort to follow"):
        generate_cohort(tmp_path / "bad2", 1, 5, scale=SCALE, progress=False,
                        later_release_of=tmp_path / "nothing")
