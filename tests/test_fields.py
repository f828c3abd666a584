import pandas as pd
import pytest

from biometry.cli import main as cli_main
from biometry.config import fields


def test_catalogue_holds_both_target_lists():
    assert len(fields.study_fields("scirep2020")) == 64
    assert len(fields.study_fields("mimir2021")) == 72  # 71 regression targets + diabetes status
    assert "age" in fields.study_fields("scirep2020")


def test_native_units_and_conversion():
    vat = fields.get("23289")
    assert (vat.native_unit, vat.unit, vat.factor) == ("cm3", "L", 0.001)
    assert fields.get("23278").factor == 0.001  # DXA masses are in g in UKB, kg in the papers
    assert fields.to_unit("23278", 25000.0) == pytest.approx(25.0)
    assert fields.get("22407").factor == 1.0


def test_ids_stay_strings_and_columns():
    assert fields.get(22407).key == "22407"
    assert fields.column("22407") == "22407-2.0"
    assert fields.column("31") == "31-0.0"
    assert fields.column("102", array=1) == "102-2.1"
    assert fields.parse_column("22407-2.0") == ("22407", 2, 0)
    assert fields.parse_column("eid") is None
    with pytest.raises(KeyError, match="derived"):
        fields.column("age")


def test_unknown_field_names_itself():
    with pytest.raises(KeyError, match="99999"):
        fields.get("99999")
    with pytest.raises(KeyError, match="1234, 5678"):
        fields.validate(["22407", "1234", "5678"])


def test_bilateral_partners_are_symmetric():
    cat = fields.catalogue()
    for left, right in fields.bilateral_pairs():
        assert cat.loc[left, "side"] == "L" and cat.loc[right, "side"] == "R"
        assert cat.loc[right, "partner"] == left
    assert ("22405", "22403") in fields.bilateral_pairs()


def test_dxa_mri_pairs_refer_to_catalogue():
    p = fields.pairs()
    assert isinstance(p, pd.DataFrame) and len(p) >= 5
    cat = fields.catalogue()
    assert set(p.a) | set(p.b) <= set(cat.index)
    assert ("23289", "22407") in set(zip(p.a, p.b))


def test_cli_lists_and_rejects(capsys):
    assert cli_main(["fields", "--list", "scirep2020"]) == 0
    assert "64 fields" in capsys.readouterr().out
    assert cli_main(["nonsense"]) == 2
