"""Study presets: every shipped preset loads; bad presets fail with one clear line."""

from __future__ import annotations

import pytest
import yaml

from biometry.config import study as config
from biometry.config.population import POPULATION, check_population_value, non_default, population
from biometry.config.study import StudyError, load_study, new_study
from biometry.runs.pipeline import PIPELINE

PRESETS = ["demo", "liver2020", "mimir2021", "scirep2020", "thigh2024"]


def test_all_presets_load_and_are_valid():
    assert set(PRESETS) <= set(config.available_studies())
    for name in PRESETS:
        s = load_study(name)
        assert s.name == name
        assert all(isinstance(k, str) for k in s.fields)
        assert s.training.in_channels == config.format_shape(s.format)[0]


def test_paper_settings():
    sci = load_study("scirep2020")
    assert len(sci.fields) == 64 and "22407" in sci.fields
    assert sci.folds == 7 and not sci.multi_field and len(sci.networks()) == 64
    t = sci.training
    assert (t.arch, t.loss, t.optimizer, t.lr, t.batch_size) == ("resnet50", "mse", "adam", 1e-4, 32)
    assert (t.iterations, t.lr_steps, t.translate_px) == (6000, (5000,), 16)
    mim = load_study("mimir2021")
    assert mim.multi_field and len(mim.networks()) == 4 and mim.calibration  # four modules
    assert (mim.training.head, mim.training.lr, mim.training.lr_steps) == ("mean_variance", 5e-5,
                                                                          (8000,))
    thigh = load_study("thigh2024")
    assert thigh.training.freeze_backbone and thigh.training.epochs == 50
    assert thigh.train_folds == (0,) and thigh.folds == 10
    demo = load_study("demo")
    assert {"22407", "21002", "22405", "22402", "47"} <= set(demo.fields)
    assert demo.data["source"] == "phantom"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(StudyError) as err:
        load_study("scirep2021")
    msg = str(err.value)
    assert "unknown study preset 'scirep2021'" in msg and "scirep2020" in msg and "demo" in msg
    assert "\n" not in msg


def _write(tmp_path, **changes):
    raw = yaml.safe_load(config.STUDIES_DIR.joinpath("demo.yaml").read_text())
    raw.update(changes)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write_text(path, text):
    path.write_text(text)
    return path


def test_field_keys_validated_and_coerced_to_str(tmp_path):
    path = tmp_path / "ints.yaml"
    text = config.STUDIES_DIR.joinpath("demo.yaml").read_text()
    text = text.replace('fields: ["22407", "22405", "22403", "22402", "21002", "47", "23289"]',
                        "fields: [22407, 21002, 47]")
    with pytest.raises(StudyError, match="saliency.fields 22405, 22403, 22402 are not fields"):
        load_study(_write_text(path, text))
    text = "\n".join(line for line in text.splitlines() if not line.startswith("saliency:"))
    path.write_text(text)
    assert yaml.safe_load(text)["fields"] == [22407, 21002, 47]      # YAML reads ints
    assert load_study(path).fields == ("22407", "21002", "47")
    with pytest.raises(StudyError, match="not in the field catalogue: 99999, nonsense"):
        load_study(_write(tmp_path, fields=["22407", 99999, "nonsense"]))


def test_other_errors(tmp_path):
    with pytest.raises(StudyError, match="training.in_channels=3 but format 'projection' has 2"):
        load_study(_write(tmp_path, training={"arch": "resnet18", "in_channels": 3}))
    with pytest.raises(StudyError, match="unknown training option"):
        load_study(_write(tmp_path, training={"learning_rate": 1e-3}))
    with pytest.raises(StudyError, match="unknown format 'dixon'"):
        load_study(_write(tmp_path, format="dixon"))
    with pytest.raises(StudyError, match="unknown key"):
        load_study(_write(tmp_path, epochs=3))
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    phantom = {"source": "phantom", "subjects": 400, "seed": 0, "scale": 0.35}
    with pytest.raises(StudyError, match=r"data.thigh_asymmetry must be a number in \[0, 0.5\]"):
        load_study(_write(tmp_path, data=dict(phantom, thigh_asymmetry=0.9)))
    assert load_study(_write(tmp_path, data=dict(phantom, thigh_asymmetry=0.1))).data[
        "thigh_asymmetry"] == 0.1
    with pytest.raises(StudyError, match=r"data.liver_fat_coupling must be a number in \[0, 1\] "
                                         r"\(how far liver fat follows"):
        load_study(_write(tmp_path, data=dict(phantom, liver_fat_coupling=True)))
    with pytest.raises(StudyError, match=r"data.liver_fat_coupling is an option of the phantom; "
                                         r"this study's data.source is 'ukb'"):
        load_study(_write(tmp_path, data={"source": "ukb", "liver_fat_coupling": 0.0}))
    both = load_study(_write(tmp_path, data=dict(phantom, thigh_asymmetry=0.1,
                                                  liver_fat_coupling=0)))
    # the options are checked, never mistaken for the study's own settings
    assert both.data["liver_fat_coupling"] == 0 and both.name == "demo"
    with pytest.raises(StudyError, match=r"unknown key data.liver_coupling for a phantom study; "
                                         r"did you mean 'liver_fat_coupling'\? \(known: "):
        load_study(_write(tmp_path, data=dict(phantom, liver_coupling=0.0)))
    with pytest.raises(StudyError, match=r"data.liver_fat_coupling must be a number in \[0, 1\]"
                                         r".*got '0.5'"):
        load_study(_write(tmp_path, data=dict(phantom, liver_fat_coupling="0.5")))
    # null, as None in the API and the CLI, is the default
    assert load_study(_write(tmp_path, data=dict(phantom, liver_fat_coupling=None))).data[
        "liver_fat_coupling"] is None


def test_label_counts_and_store_format_checks():
    demo = load_study("demo")
    counts = dict.fromkeys(demo.fields, 100)
    demo.check_label_counts(counts)
    counts["22402"] = 4
    with pytest.raises(StudyError, match=r"too few labelled subjects .*22402 \(4\)"):
        demo.check_label_counts(counts)
    with pytest.raises(StudyError, match="no 'projection' images"):
        demo.check_format(["mimir"])
    assert demo.train_config(seed=3).seed == 3
    assert demo.to_dict()["fields"] == list(demo.fields)


def test_release_block(tmp_path):
    assert load_study("demo").release == {"subjects": 400, "seed": 1}
    with pytest.raises(StudyError, match=r"release must be \{subjects: N, seed: S\} for phantom "
                                         r"data$"):
        load_study(_write(tmp_path, release={"subjects": 10}))
    with pytest.raises(StudyError, match="release.subjects must be a positive and release.seed a "
                                         "non-negative integer, got 0 and 1"):
        load_study(_write(tmp_path, release={"subjects": 0, "seed": 1}))
    real = _write(tmp_path, data={"source": "ukb", "fields_csv": "f.csv", "prepared": "p"},
                  release={"input": "zips", "fields_csv": "release.csv"})
    assert load_study(real).release == {"input": "zips", "fields_csv": "release.csv"}
    # a study of one's own from the demo keeps no phantom release (it names its own)
    mine = new_study("mine", "demo", tmp_path / "fields.csv", tmp_path / "prepared", out_dir=tmp_path)
    assert load_study(mine).release is None



def test_saliency_block_names_its_gradcam_layer(tmp_path):
    """The demo aggregates at layer3 (4 x 4 at its 64 px input); a study may name another ResNet
    layer, and an unknown one is refused with the allowed names."""
    demo = load_study("demo")
    assert demo.saliency["layer"] == "layer3"
    text = config.STUDIES_DIR.joinpath("demo.yaml").read_text()
    start = text.index("saliency: {")
    line = text[start:text.index("\n", start)]
    plain = line.replace(', layer: layer3', '')
    assert load_study(_write_text(tmp_path / "a.yaml", text.replace(line, plain))).saliency[
        "layer"] == "layer4"
    bad = line.replace("layer3", "layer9")
    with pytest.raises(StudyError, match="saliency.layer 'layer9' is not one of layer4, layer3"):
        load_study(_write_text(tmp_path / "b.yaml", text.replace(line, bad)))
    # occlusion is off unless asked for, and then reaches the stage's notebook
    assert "occlusion" not in demo.saliency
    stage = next(s for s in PIPELINE if s.name == "saliency")
    assert "occlusion" not in stage.parameters(demo)
    asked = load_study(_write_text(tmp_path / "c.yaml", text.replace(line, line.replace(
        "layer: layer3", "layer: layer3, occlusion: true"))))
    assert asked.saliency["occlusion"] is True and stage.parameters(asked)["occlusion"] is True
    with pytest.raises(StudyError, match="saliency.occlusion must be true or false, got 'yes'"):
        load_study(_write_text(tmp_path / "d.yaml", text.replace(line, line.replace(
            "layer: layer3", "layer: layer3, occlusion: 'yes'"))))


def test_population_options_are_checked_by_one_table():
    assert population() == {k: o.default for k, o in POPULATION.items()}
    assert population({"liver_fat_coupling": 0, "thigh_asymmetry": None}) == {
        "thigh_asymmetry": 0.02, "liver_fat_coupling": 0.0}
    for bad in (True, float("nan"), "a lot", None, 1.01, -0.1):
        with pytest.raises(ValueError, match=r"^liver_fat_coupling must be a number in \[0, 1\]"):
            check_population_value("liver_fat_coupling", bad)
    assert check_population_value("liver_fat_coupling", "0.5") == 0.5  # a CLI's text
    with pytest.raises(ValueError, match="unknown population option 'liver_coupling'; known: "
                                         "thigh_asymmetry, liver_fat_coupling"):
        population({"liver_coupling": 0.0})
    assert non_default(population({"thigh_asymmetry": 0.1})) == {"thigh_asymmetry": 0.1}
