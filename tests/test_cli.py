"""The command line as a user meets it: the README commands, and bad input (exit 2, one clear
line, no partial output)."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fp_export.cli import app
from fp_export.hf.loading import DEFAULT_MODEL

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_quantize_then_eval_json(tmp_path):
    out = tmp_path / "q"
    r = run("quantize", "--recipe", "w8a8-fp8", "--out", out, "--nsamples", 2, "--seqlen", 64, "--max-eval-windows", 2)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and (out / "fp_export.json").is_file()
    manifest = json.loads((out / "fp_export.json").read_text())
    assert manifest["metrics"]["windows"] == 2 and manifest["recipe"]["name"] == "w8a8-fp8"
    r = run("eval", "--model", out, "--max-windows", 2, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"perplexity", "tokens", "seqlen"} and res["tokens"] == 2 * res["seqlen"]
    assert abs(res["perplexity"] - manifest["metrics"]["perplexity"]) < 1e-9
    r = run("quantize", "--recipe", "w8a8-fp8", "--out", out)
    assert r.exit_code == 2 and "exists" in r.output


def expect_user_error(args, *needles, tmp_out=None):
    r = run(*args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    for n in needles:
        assert n in text, text
    if tmp_out is not None:
        assert not tmp_out.exists()
        assert not list(tmp_out.parent.glob(f".{tmp_out.name}*tmp*"))


def test_missing_model_dir(tmp_path):
    expect_user_error(["eval", "--model", tmp_path / "nope"], "no such directory")
    expect_user_error(["eval", "--model", "meta-llama/Llama-2-7b"], "cannot be fetched offline")


def copy_model(tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(DEFAULT_MODEL, dst)
    return dst


def test_pickle_weights_refused(tmp_path):
    m = copy_model(tmp_path)
    (m / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, m / "pytorch_model.bin")
    out = tmp_path / "out"
    expect_user_error(["quantize", "--model", m, "--recipe", "w8a8-fp8", "--out", out],
                      "pytorch_model.bin", "safetensors only", tmp_out=out)


def test_corrupt_config_and_weights(tmp_path):
    m = copy_model(tmp_path)
    (m / "config.json").write_text("{not json")
    expect_user_error(["eval", "--model", m], "config.json", "not valid JSON")
    m2 = copy_model(tmp_path, "m2")
    (m2 / "model.safetensors").write_bytes(b"\x00" * 64)
    expect_user_error(["eval", "--model", m2], "cannot load weights")


def test_nan_weights_name_the_tensor(tmp_path):
    m = copy_model(tmp_path)
    t = load_file(m / "model.safetensors")
    t["model.layers.2.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(t, m / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    expect_user_error(["quantize", "--model", m, "--recipe", "w8a8-fp8", "--out", out],
                      "model.layers.2.mlp.up_proj.weight", "NaN", tmp_out=out)


def test_unknown_recipe_key_and_bad_group_size(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nweights:\n  format: fp4_e2m1\n  grup_size: 128\n")
    out = tmp_path / "out"
    expect_user_error(["quantize", "--recipe", bad, "--out", out], "weights.grup_size", "unknown key", tmp_out=out)
    bad.write_text("name: x\nweights:\n  format: fp4_e2m1\n  group_size: 383\n  method: rtn\n")
    expect_user_error(["quantize", "--recipe", bad, "--out", out], "group_size must be even, got 383", tmp_out=out)
    bad.write_text("name: x\nweights:\n  format: fp8_e4m3\n  scale_constraint: m2\n")
    expect_user_error(["quantize", "--recipe", bad, "--out", out], "needs format fp4_e2m1", tmp_out=out)


def test_every_bundled_recipe_loads():
    from fp_export.quant.recipe import bundled_recipes, load_recipe

    names = bundled_recipes()
    assert {"w16a16", "w8a8-int8", "w8a8-fp8", "w4a8-int4", "w4a8-fp4", "w4a8-fp4-lorc", "w4a8-fp4-m1",
            "w4a8-fp4-m2", "w4a8-fp4-m2-lorc"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.name == n and len(r.digest()) == 64


def test_build_without_tensorrt_says_what_to_install(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    r = run("build", "--onnx", onnx_file, "--out", tmp_path / "m.plan")
    assert r.exit_code == 2
    assert "pip install tensorrt" in " ".join(r.output.split())
    assert not (tmp_path / "m.plan").exists()


def test_export_then_validate(quantized, tmp_path):
    q, onnx_path = quantized("w4a8-fp4-m2-lorc"), tmp_path / "m.onnx"
    r = run("export", "--model", q, "--out", onnx_path)
    assert r.exit_code == 0, r.output
    for precision, windows in (("float64", 1), ("float32", 4)):
        r = run("validate", "--model", q, "--onnx", onnx_path, "--precision", precision, "--windows", windows, "--json")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout[r.stdout.index("{"):])
        assert report["precision"] == precision and report["windows"] == windows and report["passed"]
    assert report["noise_floor_top1"] > 0.9
    expect_user_error(["validate", "--model", q, "--onnx", onnx_path, "--precision", "float16"], "unknown precision")
    expect_user_error(["validate", "--model", q, "--backend", "gpu"], "--precision float32")
