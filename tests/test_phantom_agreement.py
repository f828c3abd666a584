"""On the phantom, where the truth is known, the DXA-vs-MRI analysis finds what the generator put in.

The generator measures DXA VAT only in the android band (with some SAT leaking in), so DXA VAT
is about 0.3 of MRI VAT, strongly correlated; and it makes the dedicated liver-fat measurement
22402 = 1.08 f + 0.012 f² − 0.3 (+ noise) of the atlas PDFF f (22436), i.e. a slope above one.
"""

import pytest

from biometry.analysis.agreement import method_comparison
from biometry.data.tables import references_from_fields_csv
from biometry.phantom import sample_fields


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    observed, _truth = sample_fields(600, seed=11, scale=0.15)
    path = tmp_path_factory.mktemp("phantom") / "fields.csv"
    observed.to_csv(path, index=False)
    return references_from_fields_csv(path, ["22407", "23289", "22402", "22436"])


def _row(table, field, from_field):
    sel = table[(table["field"] == field) & (table["from_field"] == from_field)]
    assert len(sel) == 1, f"no comparison of {field} on {from_field}"
    return sel.iloc[0]


def test_dxa_vat_is_a_systematic_fraction_of_mri_vat(references):
    table = method_comparison(references)
    dxa_on_mri = _row(table, "23289", "22407")
    assert dxa_on_mri["n"] > 100
    assert dxa_on_mri["pearson_r"] > 0.9            # strongly related ...
    assert 0.2 < dxa_on_mri["slope"] < 0.45         # ... but DXA sees only the android band
    assert dxa_on_mri["raw_mean_difference"] < -1.0  # DXA − MRI, litres
    mri_on_dxa = _row(table, "22407", "23289")
    assert mri_on_dxa["slope"] > 2.0
    # the LoA of a fitted method are those of its residuals: positive width, centred on zero
    assert dxa_on_mri["loa_low"] < 0 < dxa_on_mri["loa_high"]


def test_liver_fat_methods_differ_as_generated(references):
    table = method_comparison(references)
    ref_on_atlas = _row(table, "22402", "22436")
    assert ref_on_atlas["pearson_r"] > 0.9
    # 1.08 f + 0.012 f² − 0.3: the linear fit over the cohort's range has a slope above 1.08
    assert 1.08 < ref_on_atlas["slope"] < 1.35
