"""The recipe files of the accuracy study (benchmarks/study_recipes/, issue 12 item 4): each loads,
has its own name, and differs from the bundled recipe it starts from by exactly the option it
studies (benchmarks/study_recipes/studies.yaml), so a row's change against its base measures that
option alone."""

import sys
from pathlib import Path

import pytest
import yaml

from fp_export.quant.recipe import bundled_recipes, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from study_table import STUDY_DIR as STUDY, flat  # noqa: E402

INDEX = yaml.safe_load((STUDY / "studies.yaml").read_text())
FILES = sorted(p.name for p in STUDY.glob("*.yaml") if p.name != "studies.yaml")


def test_index_lists_every_study_recipe_once():
    assert FILES and sorted(INDEX) == FILES


def test_names_are_the_file_stems_and_distinct_from_bundled():
    names = [load_recipe(STUDY / f).name for f in FILES]
    assert names == [f.removesuffix(".yaml") for f in FILES]
    assert len(set(names)) == len(names)
    assert not set(names) & set(bundled_recipes())


@pytest.mark.parametrize("file", FILES)
def test_differs_from_its_base_by_the_studied_option_alone(file):
    entry = INDEX[file]
    study = flat(load_recipe(STUDY / file).model_dump())
    base = flat(load_recipe(entry["base"]).model_dump())
    changed = {k for k in study.keys() | base.keys() if study.get(k) != base.get(k)} - {"name", "description"}
    assert changed == set(entry["option"]), (file, {k: (base.get(k), study.get(k)) for k in changed})


def test_overrides_reach_the_first_down_projections_only():
    for n in (2, 4):
        r = load_recipe(STUDY / f"w4a8-fp4-m2-lorc-fp8down{n}.yaml")
        for i in range(n + 1):
            layer = r.for_layer(f"model.layers.{i}.mlp.down_proj")
            if i < n:
                assert layer.weights.format == "fp8_e4m3" and layer.weights.group_size is None and layer.lorc is None
            else:
                assert layer == r
        assert r.for_layer("model.layers.0.mlp.up_proj") == r
        assert r.for_layer(f"model.layers.1{n}.mlp.down_proj") == r  # the regex is anchored on the index


def test_a16_overrides_leave_only_the_down_projections_unquantized():
    two, every = (load_recipe(STUDY / f"w8a8-fp8-a16down{s}.yaml") for s in ("2", ""))
    for i in range(12):
        down, up = f"model.layers.{i}.mlp.down_proj", f"model.layers.{i}.mlp.up_proj"
        assert every.for_layer(down).activations is None and every.for_layer(down).weights == every.weights
        assert (two.for_layer(down).activations is None) == (i < 2)
        assert two.for_layer(up) == two and every.for_layer(up) == every
