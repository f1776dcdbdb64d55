"""Recipe options beyond the paper's grids: per-layer overrides (named layers kept at higher
precision) and MoFQ's per-layer choice between grids by output error."""

import pytest
import torch

import fp_export as fx
from fp_export.ptq.sequential import output_error, quantize_weight
from fp_export.quant.gptq import HessianAccumulator
from fp_export.quant.recipe import RecipeError, WeightConfig, recipe_from_dict

from conftest import fast_recipe


def test_overrides_apply_in_order_and_null_turns_a_part_off():
    base = fx.load_recipe("w4a8-fp4-m2-lorc").model_dump()
    r = recipe_from_dict({**base, "overrides": [
        {"match": r"layers\.[01]\.mlp\.down_proj", "weights": {"format": "fp8_e4m3", "group_size": None}},
        {"match": r"layers\.0\.mlp\.down_proj", "weights": None}]}, "test")
    assert r.for_layer("model.layers.0.mlp.down_proj").weights is None
    assert r.for_layer("model.layers.0.mlp.down_proj").lorc is None  # LoRC needs quantized weights
    assert r.for_layer("model.layers.1.mlp.down_proj").weights.format == "fp8_e4m3"
    assert r.for_layer("model.layers.1.mlp.down_proj").activations.format == "fp8_e4m3"
    assert r.for_layer("model.layers.2.mlp.down_proj") == r
    assert r.digest() != fx.load_recipe("w4a8-fp4-m2-lorc").digest()


def test_bad_override_names_the_key():
    base = fx.load_recipe("w4a8-fp4").model_dump()
    with pytest.raises(RecipeError, match=r"overrides.0.match: .*not a regular expression"):
        recipe_from_dict({**base, "overrides": [{"match": "layers.(0"}]}, "r.yaml")
    with pytest.raises(RecipeError, match=r"overrides.0.bits: unknown key"):
        recipe_from_dict({**base, "overrides": [{"match": "x", "bits": 8}]}, "r.yaml")


def test_unused_options_leave_the_recipe_digest_alone():
    r = fx.load_recipe("w4a8-fp4-m2-lorc")
    assert "overrides" not in r.model_dump() and "alternatives" not in r.model_dump()["weights"]


@pytest.mark.parametrize("dist", ["uniform", "heavy"])
def test_mofq_keeps_the_grid_of_least_output_error(dist):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(64, 256, generator=g) * 2 - 1 if dist == "uniform" else torch.randn(64, 256, generator=g) ** 3
    acc = HessianAccumulator(256)
    acc.add(torch.randn(512, 256, generator=g))
    h = acc.hessian()
    wc = WeightConfig(format="fp4_e2m1", group_size=128, method="rtn", scale_constraint="m2", alternatives=["int4"])
    chosen = quantize_weight(w, wc, h, "l")
    errs = {f: output_error(w, quantize_weight(w, WeightConfig(format=f, group_size=128, method="rtn",
                                                               scale_constraint="m2" if f == "fp4_e2m1" else "none"),
                                               h, "l").dequantize(), h) for f in ("fp4_e2m1", "int4")}
    assert chosen.fmt.name == min(errs, key=errs.get)
    assert output_error(w, chosen.dequantize(), h) == min(errs.values())


def test_a_layer_kept_at_16_bits_through_checkpoint_and_export(tmp_path):
    r = fast_recipe("w4a8-fp4-m2-lorc")
    r = r.model_copy(update={"overrides": recipe_from_dict(
        {**r.model_dump(), "overrides": [{"match": r"layers\.0\.mlp\.down_proj$", "weights": None,
                                          "activations": None}]}, "t").overrides})
    qm = fx.quantize(fx.DEFAULT_MODEL, r, out=tmp_path / "q", evaluate=False)
    assert "model.layers.0.mlp.down_proj" not in qm.manifest["layers"]
    assert "model.layers.1.mlp.down_proj" in qm.manifest["layers"]
    assert type(qm.model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    report = fx.validate(qm, fx.export_onnx(qm, tmp_path / "q.onnx"), windows=1, seqlen=128)
    assert report["passed"] and report["top1_agreement"] == 1.0, report
