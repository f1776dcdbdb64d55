"""The checkpoint contract on the embedded model: determinism, resume, verified loading, the
README's dequantization rule with an independent FP4 decoder."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fp_export.checkpoint.layout import CheckpointError, load_checkpoint
from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.checkpoint.resume import state_dir_for
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.quant.qlinear import QuantLinear
from fp_export.ptq.sequential import quantize_model

from conftest import fast_recipe, killed_after_layers


def test_two_runs_are_byte_identical(quantized, tmp_path):
    first = quantized("w4a8-fp4-m2-lorc")
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe("w4a8-fp4-m2-lorc"), tmp_path / "again", eval_text=None)
    for name in ("model.safetensors", "fp_export.json"):
        assert (first / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_killed_run_resumes_to_identical_bytes(quantized, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real = quantize_model

    with pytest.raises(KeyboardInterrupt):
        quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe("w4a8-fp4-m2-lorc"), out, eval_text=None,
                               progress=killed_after_layers(2))
    assert not out.exists(), "no partial output"
    state = state_dir_for(out)
    assert json.loads((state / "progress.json").read_text())["layers_done"] == 2

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr("fp_export.ptq.job.quantize_model", counting)
    quantize_to_checkpoint(DEFAULT_MODEL, fast_recipe("w4a8-fp4-m2-lorc"), out, resume=True, eval_text=None)
    assert calls["n"] == 1 and not state.exists()
    ref = quantized("w4a8-fp4-m2-lorc")
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_loaded_checkpoint_matches_in_memory_model_bit_for_bit(tmp_path):
    from fp_export.checkpoint.layout import checkpoint_tensors, write_checkpoint
    from fp_export.data.corpus import calibration_batch, load_text
    from fp_export.evaluate.perplexity import tokenize
    from fp_export.hf.loading import load_model

    recipe = fast_recipe("w4a8-fp4-m2-lorc")
    model, tok, dtype = load_model(DEFAULT_MODEL)
    ids = tokenize(tok, load_text("test"))
    calib = calibration_batch(ids, 4, 128, 0)
    q = quantize_model(model, recipe, calib)
    write_checkpoint(tmp_path / "c", DEFAULT_MODEL, checkpoint_tensors(model, q, dtype), recipe, q, {})
    loaded, _, _ = load_checkpoint(tmp_path / "c")
    x = ids[:256][None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def test_readme_rule_with_independent_fp4_decoder(quantized):
    """qweight nibbles decoded by ml_dtypes, then the README's M2 rule: (q * 2**scale_exp) * row_scale."""
    qdir = quantized("w4a8-fp4-m2-lorc")
    tensors = load_file(qdir / "model.safetensors")
    model, _, manifest = load_checkpoint(qdir)
    name = "model.layers.1.mlp.down_proj"
    spec = manifest["layers"][name]
    assert spec["weight_format"] == "fp4_e2m1" and spec["scale_constraint"] == "m2"
    codes = _unpack(tensors[f"{name}.qweight"].numpy())
    q = codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    exp = np.repeat(tensors[f"{name}.scale_exp"].numpy().astype(np.int32), spec["group_size"], axis=1)
    w = np.ldexp(q, exp) * tensors[f"{name}.row_scale"].numpy()[:, None]
    assert np.array_equal(w, model.get_submodule(name).weight.numpy())
    assert tensors[f"{name}.lorc_u"].dtype == torch.uint8 and f"{name}.lorc_u_scale" in tensors


@pytest.mark.parametrize("recipe,suffixes", [
    ("w8a8-fp8", {"qweight", "scale"}),
    ("w4a8-int4", {"qweight", "scale"}),
    ("w4a8-fp4-m1", {"qweight", "scale_exp"}),
    ("w8a8-fp8-static", {"qweight", "scale", "input_scale"}),
])
def test_tensor_names_per_mode(quantized, recipe, suffixes):
    tensors = load_file(quantized(recipe) / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert {k[len(name) + 1:] for k in tensors if k.startswith(name + ".")} == suffixes
    assert "model.embed_tokens.weight" in tensors and tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_tampered_checkpoint_is_refused(quantized, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(quantized("w4a8-fp4-m2"), bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(bad)


def test_w16a16_has_no_quantized_layers(quantized):
    model, _, manifest = load_checkpoint(quantized("w16a16"))
    assert manifest["layers"] == {}
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
