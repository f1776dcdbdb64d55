"""Other Hugging Face families, randomly initialized and saved locally: GPTQ quantization of
LLaMA-style Qwen2 (biases), OPT and GPT-2 (Conv1D); export of Qwen2; a clear export error for the rest."""

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fp_export.checkpoint.layout import load_checkpoint
from fp_export.export.onnx import check
from fp_export.hf.families import ExportError
from fp_export.hf.loading import DEFAULT_MODEL
from fp_export.ptq.job import quantize_to_checkpoint
from fp_export.validate.compare import validate_onnx
from fp_export.validate.runners import load_onnx_for_ort

from conftest import export_checkpoint

from conftest import fast_recipe

TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def save_random(model_cls, config, path):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER:
        shutil.copyfile(DEFAULT_MODEL / f, path / f)
    return path


FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, tie_word_embeddings=False)),
    "opt": (OPTForCausalLM, OPTConfig(vocab_size=4096, hidden_size=256, ffn_dim=512, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=256)),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=4096, n_embd=256, n_layer=2, n_head=4, n_positions=256)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quantizes_with_gptq(tmp_path, family):
    cls, cfg = FAMILIES[family]
    src = save_random(cls, cfg, tmp_path / family)
    out = tmp_path / f"{family}-q"
    m = quantize_to_checkpoint(src, fast_recipe("w4a8-fp4-m2-lorc"), out, max_eval_windows=2)
    assert len(m["layers"]) in (12, 14, 8)  # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj per layer
    assert m["metrics"]["perplexity"] > 0
    model, _, _ = load_checkpoint(out)
    if family == "qwen2":
        onnx_path = export_checkpoint(out, tmp_path / "q.onnx", reference=True)
        check(onnx_path)
        ids = torch.randint(0, 4096, (2, 64))
        report = validate_onnx(model, load_onnx_for_ort(onnx_path), ids, "float32")
        assert report["perplexity_rel_diff"] < 0.005
        report = validate_onnx(model, load_onnx_for_ort(onnx_path), ids, "float64")
        assert report["top1_agreement"] == 1.0 and report["max_rel_logit_error"] < 1e-6, report
    else:
        with pytest.raises(ExportError, match=cls.__name__):
            export_checkpoint(out, tmp_path / "x.onnx")
