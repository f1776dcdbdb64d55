"""Model directories fp-export cannot quantize are refused naming what their config says."""

from typer.testing import CliRunner

from fp_export.cli import app


def test_encoder_directory_names_its_config_architecture(tmp_path):
    """A BERT encoder (config says BertModel) is refused naming BertModel, not the BertLMHeadModel
    transformers would build from it, before its weights are loaded."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert", safe_serialization=True)
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "bert")])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "['BertModel']" in flat and "not a causal LM" in flat, r.output
    assert "BertLMHeadModel" not in flat
