"""Activation-only recipes (W16A8): the linears' weights are stored in the model's dtype, and the
loaded checkpoint computes exactly what the quantizing run computed."""

import pytest
import torch
from safetensors.torch import load_file

from fp_export.checkpoint.layout import checkpoint_tensors, load_checkpoint, write_checkpoint
from fp_export.data.corpus import calibration_batch, load_text
from fp_export.evaluate.perplexity import tokenize
from fp_export.hf.loading import DEFAULT_MODEL, load_model
from fp_export.ptq.sequential import quantize_model
from fp_export.quant.qlinear import QuantLinear

from conftest import fast_recipe


@pytest.mark.parametrize("name", ["w16a8-fp8", "w16a8-int8"])
def test_weights_in_model_dtype_and_forward_identical(name, tmp_path):
    recipe = fast_recipe(name)
    model, tok, dtype = load_model(DEFAULT_MODEL)
    ids = tokenize(tok, load_text("test"))
    q = quantize_model(model, recipe, calibration_batch(ids, 1, 64, 0))
    write_checkpoint(tmp_path / "c", DEFAULT_MODEL, checkpoint_tensors(model, q, dtype), recipe, q, {})
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    assert dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    assert torch.equal(w.float(), model.get_submodule("model.layers.0.mlp.down_proj").weight)
    loaded, _, manifest = load_checkpoint(tmp_path / "c")
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["act_format"] == recipe.activations.format
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    x = ids[:128][None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
