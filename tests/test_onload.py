"""Sequential onloading and sharded weights (issue 9), on the CPU: the lazy, layer-at-a-time path
gives the whole-model path's bytes, sharded inputs and outputs, and the input / device errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fp_export.checkpoint.layout import INDEX, WEIGHTS, load_checkpoint, read_manifest
from fp_export.cli import app
from fp_export.hf.loading import DEFAULT_MODEL, ModelError
from fp_export.ptq.device import DeviceError, resolve_device
from fp_export.ptq.job import quantize_to_checkpoint

from conftest import fast_recipe, killed_after_layers

RECIPE = "w4a8-fp4-m2-lorc"
TINY_CAL = {"nsamples": 2, "seqlen": 64}


def sharded_copy(dst, shards: int = 3):
    """The default model re-written as HF shards model-0000X-of-0000Y.safetensors + index."""
    shutil.copytree(DEFAULT_MODEL, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(DEFAULT_MODEL / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return sharded_copy(tmp_path_factory.mktemp("sharded") / "kjv-llama-15m")  # same name: the manifest records it


def tiny_recipe(name: str = RECIPE):
    r = fast_recipe(name)
    return r.model_copy(update={"calibration": r.calibration.model_copy(update=TINY_CAL)})


@pytest.fixture(scope="module")
def runs(sharded, tmp_path_factory):
    """``runs(source, onload)`` -> checkpoint of the default model (``single``) or its sharded copy
    under the tiny calibration, with 2 evaluation windows (cached)."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def make(source: str, onload: bool):
        if (source, onload) not in cache:
            out = root / f"{source}-{onload}"
            quantize_to_checkpoint(DEFAULT_MODEL if source == "single" else sharded, tiny_recipe(), out,
                                   max_eval_windows=2, onload=onload)
            cache[source, onload] = out
        return cache[source, onload]

    return make


def same_checkpoint(a, b, model_sha_differs=False):
    assert (a / WEIGHTS).read_bytes() == (b / WEIGHTS).read_bytes()
    ma, mb = read_manifest(a), read_manifest(b)
    if model_sha_differs:  # the model digest covers file names and bytes, which sharding changes
        assert ma["base_model"].pop("sha256") != mb["base_model"].pop("sha256")
    assert ma == mb


def test_onloaded_cpu_equals_whole_model_bytes(runs):
    """The GPU path's code run on the CPU: the whole-model path's bytes, manifest (test perplexity
    by layer-at-a-time evaluation) included."""
    for name in (WEIGHTS, "fp_export.json"):
        assert (runs("single", False) / name).read_bytes() == (runs("single", True) / name).read_bytes(), name


@pytest.mark.parametrize("onload", [False, True])
def test_sharded_input_gives_the_same_checkpoint(runs, onload):
    same_checkpoint(runs("single", False), runs("sharded", onload), model_sha_differs=True)


def test_onloaded_resume_is_byte_identical(runs, tmp_path):
    out = tmp_path / "resumed"

    with pytest.raises(KeyboardInterrupt):
        quantize_to_checkpoint(DEFAULT_MODEL, tiny_recipe(), out, max_eval_windows=2, onload=True,
                               progress=killed_after_layers(2))
    assert not out.exists()
    quantize_to_checkpoint(DEFAULT_MODEL, tiny_recipe(), out, max_eval_windows=2, onload=True, resume=True)
    same_checkpoint(runs("single", True), out)


def test_sharded_output_loads_like_single_file(runs, tmp_path):
    quantize_to_checkpoint(DEFAULT_MODEL, tiny_recipe(), tmp_path / "s", max_eval_windows=2,
                           max_shard_bytes=2 * 2**20)
    files = sorted(p.name for p in (tmp_path / "s").glob("model*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "s" / WEIGHTS).exists()
    index = json.loads((tmp_path / "s" / INDEX).read_text())
    single = load_file(runs("single", False) / WEIGHTS)
    assert sorted(index["weight_map"]) == sorted(single)
    assert set(read_manifest(tmp_path / "s")["files"]) >= set(files) | {INDEX}
    a, _, _ = load_checkpoint(runs("single", False))
    b, _, _ = load_checkpoint(tmp_path / "s")
    ids = torch.arange(64)[None]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def expect_exit_2(args, *needles):
    r = run_cli(*args)
    assert r.exit_code == 2, r.output
    text = "".join(r.output.split())  # rich folds long paths across lines: compare without whitespace
    for n in needles:
        assert "".join(n.split()) in text, r.output


def test_missing_and_truncated_shards_exit_2(sharded, tmp_path):
    missing = shutil.copytree(sharded, tmp_path / "missing")
    (missing / "model-00002-of-00003.safetensors").unlink()
    truncated = shutil.copytree(sharded, tmp_path / "truncated")
    shard = truncated / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    for device in ("cpu", "auto"):
        expect_exit_2(["quantize", "--model", missing, "--recipe", "w8a8-fp8", "--out", tmp_path / "o",
                       "--device", device], "model-00002-of-00003.safetensors", "shard named in", "missing")
        expect_exit_2(["quantize", "--model", truncated, "--recipe", "w8a8-fp8", "--out", tmp_path / "o",
                       "--device", device], "model-00003-of-00003.safetensors", "truncated")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_exits_2(tmp_path):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    expect_exit_2(["quantize", "--recipe", "w8a8-fp8", "--out", tmp_path / "o", "--device", "cuda"],
                  "device cuda", "no CUDA GPU", "--device cpu")
    expect_exit_2(["quantize", "--recipe", "w8a8-fp8", "--out", tmp_path / "o", "--device", "tpu"], "choose cpu")


def test_out_of_memory_names_layer_and_bytes(tmp_path, monkeypatch):
    def oom(layer, recipe, inputs, kwargs, where, store):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("fp_export.ptq.onload._calibrate_and_replace", oom)
    with pytest.raises(DeviceError) as e:
        quantize_to_checkpoint(DEFAULT_MODEL, tiny_recipe(), tmp_path / "o", eval_text=None, onload=True)
    msg = str(e.value)
    # the default model's layer: 4 float32 copies of its 512*512*2 + 512*256*2 + 512*1536*3 + 2*512
    # parameters, and 4 float64 Hessians of its widest linear input (down_proj: 1536)
    workspace = 4 * 4 * (512 * 512 * 2 + 512 * 256 * 2 + 512 * 1536 * 3 + 1024) + 4 * 8 * 1536**2
    assert "model.layers.0: out of GPU memory" in msg and "fewer calibration samples (--nsamples)" in msg
    assert f"workspace {workspace / 2**30:.2f} GiB" in msg
    assert not (tmp_path / "o").exists()


def test_nan_weight_in_a_shard_is_named(sharded, tmp_path):
    m = shutil.copytree(sharded, tmp_path / "nan")
    index = json.loads((m / INDEX).read_text())["weight_map"]
    name = "model.layers.2.mlp.up_proj.weight"
    t = load_file(m / index[name])
    t[name][3, 7] = float("nan")
    save_file(t, m / index[name], metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.2.mlp.up_proj.weight has 1 NaN"):
        quantize_to_checkpoint(m, tiny_recipe("w8a8-fp8"), tmp_path / "o", eval_text=None, onload=True)


def test_plain_log_lines_when_stderr_is_not_a_terminal(tmp_path):
    r = run_cli("quantize", "--recipe", "w8a8-fp8", "--out", tmp_path / "o", "--nsamples", 2, "--seqlen", 64,
                "--no-eval")
    assert r.exit_code == 0, r.output
    for i in range(1, 5):
        assert f"fp-export: layer {i}/4 model.layers.{i - 1} quantized in" in r.output


def test_hidden_states_spill_when_they_and_the_workspace_exceed_the_budget(monkeypatch):
    """``plan_store``'s rule on a (pretend) GPU: states + workspace < 90% of the budget stay on the
    device, else they wait in pinned CPU memory; ``--max-gpu-memory`` is the budget when smaller."""
    from types import SimpleNamespace

    from fp_export.ptq import onload

    budgets = []
    monkeypatch.setattr(onload, "memory_budget", lambda dev, cap: budgets.append(cap) or (cap or 80 * 2**30))
    m = SimpleNamespace(device=torch.device("cuda"), model=SimpleNamespace(config=SimpleNamespace(hidden_size=8192)))
    states = 2 * 128 * 2048 * 8192 * 4  # 16 GiB: a 70B-shaped model's 128 x 2048 calibration rows
    workspace = 38 * 2**30
    assert isinstance(onload.plan_store(m, 128, 2048, workspace), onload.DeviceStore)
    assert isinstance(onload.plan_store(m, 128, 2048, workspace, 40 * 2**30), onload.PinnedStore)
    assert isinstance(onload.plan_store(m, 16, 2048, 20 * 2**30, 40 * 2**30), onload.DeviceStore)
    assert budgets == [None, 40 * 2**30, 40 * 2**30] and states == 16 * 2**30
