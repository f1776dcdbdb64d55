"""GGUF -> HF conversion: the embedded default model written as a llama.cpp-style GGUF (tensor
names, Q/K row permutation and tokenizer fields as llama.cpp's convert_hf_to_gguf.py writes them)
converts back to the same weights, tokenizer and perplexity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fp_export.cli import app
from fp_export.hf.gguf import SIDECAR, convert_gguf, sha256_file
from fp_export.hf.loading import DEFAULT_MODEL

gguf = pytest.importorskip("gguf")

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def write_default_model_gguf(path, arch: str = "llama") -> None:
    """The embedded kjv-llama-15m as a MOSTLY_BF16 GGUF file."""
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    sd = load_file(DEFAULT_MODEL / "model.safetensors")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("kjv-llama-15m")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for name, t in sd.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{NAMES[rest.removesuffix('.weight')]}.weight"
        a = _bf16_bits(t)
        kind = gname.split(".")[-2]
        if kind in heads:
            a = _permute(a, heads[kind])
        w.add_tensor(gname, np.ascontiguousarray(a), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "kjv.gguf"
    write_default_model_gguf(path)
    return path


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    return convert_gguf(gguf_file, tmp_path_factory.mktemp("hf") / "kjv-hf")


def test_round_trip_weights_config_tokenizer(gguf_file, converted):
    from transformers import AutoTokenizer

    orig = load_file(DEFAULT_MODEL / "model.safetensors")
    got = load_file(converted / "model.safetensors")
    assert set(got) == set(orig)
    for k in orig:
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], orig[k]), k
    cfg, ref = (json.loads((d / "config.json").read_text()) for d in (converted, DEFAULT_MODEL))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "tie_word_embeddings", "model_type", "dtype"):
        assert cfg[key] == ref[key], key
    assert cfg["rope_parameters"]["rope_theta"] == ref["rope_parameters"]["rope_theta"]
    text = "In the beginning God created the heaven and the earth.\n\nAnd the earth was without form"
    a, b = (AutoTokenizer.from_pretrained(d)(text, add_special_tokens=False)["input_ids"]
            for d in (converted, DEFAULT_MODEL))
    assert a == b
    side = json.loads((converted / SIDECAR).read_text())
    assert side["sha256"] == sha256_file(gguf_file) and side["dtype"] == "bfloat16"
    assert side["architecture"] == "llama" and side["file_type"] == 32


def test_model_gguf_accepted_as_model(gguf_file, tmp_path, monkeypatch):
    """``--model FILE.gguf`` evaluates the cached conversion: same perplexity as the source dir."""
    monkeypatch.setenv("FP_EXPORT_CACHE", str(tmp_path))
    args = ["eval", "--json", "--max-windows", "2", "--seqlen", "128"]
    r1 = CliRunner().invoke(app, [*args, "--model", str(gguf_file)])
    r2 = CliRunner().invoke(app, [*args, "--model", str(DEFAULT_MODEL)])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert json.loads(r1.stdout.strip().splitlines()[-1]) == json.loads(r2.stdout.strip().splitlines()[-1])
    (cached,) = (tmp_path / "gguf").iterdir()
    assert cached.name.startswith("kjv-") and (cached / SIDECAR).is_file()


def test_convert_errors_exit_2(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    t5 = tmp_path / "t5.gguf"
    w = gguf.GGUFWriter(str(t5), "t5")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    cases = [(tmp_path / "missing.gguf", "no such GGUF file"), (bad, "not a GGUF file"),
             (t5, "GGUF architecture 't5' is not supported")]
    for src, msg in cases:
        r = CliRunner().invoke(app, ["convert", "--gguf", str(src), "--out", str(tmp_path / "out")])
        assert r.exit_code == 2, r.output
        flat = " ".join(r.output.split())  # rich wraps long lines
        assert msg in flat and src.name in r.output.replace("\n", "")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_convert_refuses_existing_out(gguf_file, converted):
    r = CliRunner().invoke(app, ["convert", "--gguf", str(gguf_file), "--out", str(converted)])
    assert r.exit_code == 2 and "exists" in " ".join(r.output.split())

