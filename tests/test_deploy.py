"""Deployment: Triton model repositories (configs parsed against Triton's own schema) and a real
``tritonserver`` (the nvidia-pytriton wheel) on 127.0.0.1 serving the default model's
w4a8-fp4-m2-lorc checkpoint over HTTP and gRPC."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import fp_export as fx
from fp_export.deploy import DeployError, ServerUnavailable, deploy, serve
from fp_export.deploy import repository as rep
from fp_export.deploy import server as srv

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="pip install -e \".[serve]\"")
text_format = pytest.importorskip("google.protobuf.text_format")

RECIPE = "w4a8-fp4-m2-lorc"
NAME = "kjv"
# "In the beginning God", "And the LORD said", "Blessed are the poor", "The LORD is my" (4 tokens each)
PROMPTS = [[1133, 259, 2071, 387], [296, 259, 341, 388], [2613, 419, 259, 1408], [449, 341, 334, 376]]


def parse(text: str):
    return text_format.Parse(text, mc.ModelConfig())


def find_stray(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".deploy-" in p.name]


# ------------------------------------------------------------------ configs and repositories


def test_python_configs_parse_against_triton_schema(tmp_path):
    g = parse(rep.generate_config("m", tmp_path / "env", max_batch_size=4, device="cpu"))
    assert (g.name, g.backend, g.max_batch_size) == ("m", "python", 4)
    assert g.model_transaction_policy.decoupled and g.HasField("dynamic_batching")
    ins = {i.name: i for i in g.input}
    assert ins["input_ids"].data_type == mc.TYPE_INT64 and list(ins["input_ids"].dims) == [-1]
    assert ins["max_tokens"].data_type == mc.TYPE_INT32 and not ins["max_tokens"].optional
    assert all(ins[k].optional for k in ("temperature", "top_k", "top_p", "seed", "stream"))
    assert [(o.name, o.data_type) for o in g.output] == [("output_ids", mc.TYPE_INT64)]
    assert g.parameters["EXECUTION_ENV_PATH"].string_value == str(tmp_path / "env")
    assert g.parameters["MODE"].string_value == "generate" and g.parameters["DEVICE"].string_value == "cpu"
    lg = parse(rep.logits_config("m_logits", "../m/1/checkpoint", tmp_path / "env"))
    assert lg.max_batch_size == 0 and not lg.model_transaction_policy.decoupled
    assert list(lg.input[0].dims) == [-1, -1] and list(lg.output[0].dims) == [-1, -1, -1]
    assert lg.parameters["CHECKPOINT"].string_value == "../m/1/checkpoint"
    assert srv.repository_envs([]) == []


@pytest.fixture(scope="module")
def reference_onnx(quantized, tmp_path_factory):
    import onnx

    path = fx.export_onnx(fx.load(quantized(RECIPE)), tmp_path_factory.mktemp("onnx") / "ref.onnx", reference=True)
    return onnx.load(path, load_external_data=False)


@pytest.mark.slow
def test_onnxruntime_repository(quantized, tmp_path):
    res = deploy(quantized(RECIPE), tmp_path / "repo", name="kjv_ort", backend="onnxruntime")
    d = tmp_path / "repo" / "kjv_ort"
    cfg = parse((d / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("input_ids", mc.TYPE_INT64, [-1, -1])]
    vocab = fx.load(quantized(RECIPE)).model.config.vocab_size
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", mc.TYPE_FP32, [-1, -1, vocab])]
    assert (d / "1" / "model.onnx").is_file() and (d / "1" / "model.onnx.data").is_file()
    ckpt = sorted(p.name for p in (d / "1" / "checkpoint").iterdir())
    assert "fp_export.json" in ckpt and "tokenizer.json" in ckpt and "model.safetensors" not in ckpt
    assert res["models"] == ["kjv_ort"] and find_stray(tmp_path) == []
    import onnx
    import onnxruntime as ort

    meta = {p.key: p.value for p in onnx.load(d / "1" / "model.onnx", load_external_data=False).metadata_props}
    assert meta["fp_export.reference"] == "1" and meta["fp_export.recipe"] == RECIPE
    # the graph's agreement with PyTorch is validate's subject (tests/test_export.py); here: it runs as deployed
    sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": np.array([PROMPTS[0]], dtype=np.int64)})[0]
    assert got.shape == (1, 4, vocab) and np.isfinite(got).all()


def test_tensorrt_config_with_fake_plan(reference_onnx, tmp_path):
    proto = reference_onnx
    plan, plugin = tmp_path / "x.plan", tmp_path / "libfp_export_trt_plugin.so"
    plan.write_bytes(b"not an engine")
    plugin.write_bytes(b"not a library")
    rep.write_tensorrt_model(tmp_path / "repo" / "kjv_trt", "kjv_trt", plan, plugin, proto)
    d = tmp_path / "repo" / "kjv_trt"
    cfg = parse((d / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.name == "kjv_trt"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [i.name for i in cfg.input] == ["input_ids"] and [o.name for o in cfg.output] == ["logits"]
    assert (d / "1" / "model.plan").read_bytes() == b"not an engine" and (d / plugin.name).is_file()
    cmd = rep.tritonserver_command(tmp_path / "repo", d / plugin.name)
    assert cmd == (f"tritonserver --model-repository={(tmp_path / 'repo').resolve()} "
                   f"--backend-config=tensorrt,plugins=\"{(d / plugin.name).resolve()}\"")


def test_tensorrt_deploy_without_tensorrt_is_build_unavailable(quantized, tmp_path):
    from fp_export.build.engine import BuildUnavailable

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BuildUnavailable, match="TensorRT"):
        deploy(quantized(RECIPE), tmp_path / "repo", backend="tensorrt")
    assert not (tmp_path / "repo").exists() and find_stray(tmp_path) == []


def test_deploy_rejects_bad_input_before_writing(quantized, tmp_path):
    q = quantized(RECIPE)
    with pytest.raises(FileNotFoundError, match="nope"):
        deploy(tmp_path / "nope", tmp_path / "repo")
    with pytest.raises(DeployError, match="unknown backend 'triton'"):
        deploy(q, tmp_path / "repo", backend="triton")
    with pytest.raises(DeployError, match="model name 'a/b'"):
        deploy(q, tmp_path / "repo", name="a/b")
    with pytest.raises(DeployError, match="no bin/activate"):
        deploy(q, tmp_path / "repo", env=tmp_path)
    assert not (tmp_path / "repo").exists() and find_stray(tmp_path) == []


def test_server_missing_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(srv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServerUnavailable, match=r'pip install -e "\.\[serve\]"'):
        serve(tmp_path)


# ------------------------------------------------------------------ the real server


@pytest.fixture(scope="module")
def serving_env(tmp_path_factory):
    """A venv whose Python imports the fp_export under test and this interpreter's packages.

    The python backend stub sees no PYTHONPATH, only its EXECUTION_ENV_PATH environment; in CI that
    could be this venv itself (editable install of the clone), but a developer's venv may hold an
    editable install of another checkout. Two .pth lines (source root first, then this
    interpreter's site-packages with its own .pth hooks) make the served code the tested code."""
    env = tmp_path_factory.mktemp("serve") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    src = Path(fx.__file__).resolve().parents[1]
    (purelib / "a_fp_export_src.pth").write_text(f"{src}\n")
    (purelib / "b_parent.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return env


@pytest.fixture(scope="module")
def server(quantized, serving_env, tmp_path_factory):
    """One server, explicit model control: the repository deployed elsewhere and copied (it must
    be self-contained) with its models loaded; a second repository with a corrupted checkpoint
    registered but not loaded."""
    pytest.importorskip("tritonclient.http")
    srv.locate()
    root = tmp_path_factory.mktemp("triton")
    deploy(quantized(RECIPE), root / "written", name=NAME, env=serving_env)
    shutil.copytree(root / "written", root / "repo")
    shutil.rmtree(root / "written")
    deploy(quantized(RECIPE), root / "broken", name="broken", env=serving_env)
    w = root / "broken" / "broken" / "1" / "checkpoint" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    s = serve([root / "repo", root / "broken"], log=root / "server.log", load=[NAME, f"{NAME}_logits"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def qm(quantized):
    return fx.load(quantized(RECIPE))


def expected(qm, prompt, n):
    ids = torch.tensor([prompt])
    out = fx.generate(qm, ids, n, eos_token_id=qm.tokenizer.eos_token_id)[0].tolist()
    eos = qm.tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


def grpc_inputs(tg, prompt, n, **extra):
    arrays = {"input_ids": np.array([prompt], dtype=np.int64), "max_tokens": np.array([[n]], dtype=np.int32)}
    types = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "seed": np.int64, "stream": bool}
    arrays.update({k: np.array([[v]], dtype=types[k]) for k, v in extra.items()})
    from tritonclient.utils import np_to_triton_dtype

    ins = []
    for k, a in arrays.items():
        t = tg.InferInput(k, list(a.shape), np_to_triton_dtype(a.dtype))
        t.set_data_from_numpy(a)
        ins.append(t)
    return ins


def stream_generate(url, prompt, n, raw_inputs=None, **extra):
    """Tokens of one streamed request over gRPC (a list), or the error's message (a str)."""
    import tritonclient.grpc as tg

    q: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(NAME, raw_inputs or grpc_inputs(tg, prompt, n, **extra),
                                  enable_empty_final_response=True)
        tokens = []
        for _ in range(n + 2):
            result, error = q.get(timeout=120)
            if error is not None:
                return str(error)
            out = result.as_numpy("output_ids")
            if out is not None:
                assert out.shape[0] == 1
                tokens += out[0].tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens
        raise AssertionError("no final response")
    finally:
        client.stop_stream()
        client.close()


def http_generate(url, body):
    req = urllib.request.Request(f"http://{url}/v2/models/{NAME}/generate", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.mark.slow
def test_logits_equal_pytorch_over_http_and_grpc(server, qm):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    ids = np.array([PROMPTS[0], PROMPTS[1]], dtype=np.int64)
    with torch.inference_mode():
        ref = qm.model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    got = {}
    for mod, url in ((th, server.http_url), (tg, server.grpc_url)):
        client = mod.InferenceServerClient(url)
        x = mod.InferInput("input_ids", list(ids.shape), "INT64")
        x.set_data_from_numpy(ids)
        got[mod.__name__] = client.infer(f"{NAME}_logits", [x]).as_numpy("logits")
        client.close()
    for name, logits in got.items():
        assert logits.shape == ref.shape, name
        # Same float32 model, same torch build, different process and thread count: reductions may
        # be ordered differently, so allow float32 rounding noise (1e-5 of the logits' range).
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.slow
def test_greedy_generation_equals_generate_over_grpc_and_http(server, qm):
    n = 8
    for prompt in PROMPTS[:2]:
        want = expected(qm, prompt, n)
        assert stream_generate(server.grpc_url, prompt, n) == want
        assert stream_generate(server.grpc_url, prompt, n, stream=True) == want
        assert http_generate(server.http_url, {"input_ids": prompt, "max_tokens": n})["output_ids"] == want


@pytest.mark.slow
def test_sampling_is_seeded(server, qm):
    kw = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 7}
    got = stream_generate(server.grpc_url, PROMPTS[0], 6, **kw)
    again = stream_generate(server.grpc_url, PROMPTS[0], 6, **kw)
    want = fx.generate(qm, torch.tensor([PROMPTS[0]]), 6, eos_token_id=qm.tokenizer.eos_token_id, **kw)[0].tolist()
    assert got == again == want[: len(got)] and len(got) >= 1


@pytest.mark.slow
def test_32_concurrent_clients(server, qm):
    n = 2
    want = [expected(qm, p, n) for p in PROMPTS]
    results: dict[tuple[int, int], object] = {}

    def client(c: int) -> None:
        for r in range(8):
            p = (c + r) % len(PROMPTS)
            results[(c, r)] = (p, stream_generate(server.grpc_url, PROMPTS[p], n, stream=bool(r % 2)))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 32 * 8
    wrong = [(k, p, got) for k, (p, got) in results.items() if got != want[p]]
    assert not wrong, wrong[:3]


@pytest.mark.slow
def test_malformed_requests_are_refused_and_serving_continues(server, qm):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    url = server.grpc_url
    vocab = qm.model.get_input_embeddings().num_embeddings
    context = qm.model.config.max_position_embeddings
    good = expected(qm, PROMPTS[0], 3)

    def raw(name, array, dtype):
        t = tg.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    n3 = raw("max_tokens", np.array([[3]], np.int32), "INT32")
    cases = {
        "wrong dtype": ([raw("input_ids", np.array([PROMPTS[0]], np.float32), "FP32"), n3],
                        "inference input 'input_ids' data-type is 'FP32', but model 'kjv' expects 'INT64'"),
        "wrong rank": ([raw("input_ids", np.array([[PROMPTS[0]]], np.int64), "INT64"), n3], "shape"),
        "id past vocab": ([raw("input_ids", np.array([[1, vocab]], np.int64), "INT64"), n3],
                          f"token id {vocab} at [0, 1] is outside the vocabulary [0, {vocab})"),
        "negative id": ([raw("input_ids", np.array([[1, -5]], np.int64), "INT64"), n3], "token id -5"),
        "empty": ([raw("input_ids", np.zeros((1, 0), np.int64), "INT64"), n3], "input_ids is empty"),
        "context": ([raw("input_ids", np.array([PROMPTS[0]], np.int64), "INT64"),
                     raw("max_tokens", np.array([[context]], np.int32), "INT32")],
                    f"4 prompt tokens + max_tokens {context} exceed the model's context of {context} tokens"),
        "zero tokens": ([raw("input_ids", np.array([PROMPTS[0]], np.int64), "INT64"),
                         raw("max_tokens", np.array([[0]], np.int32), "INT32")], "max_tokens must be >= 1"),
        "missing max_tokens": ([raw("input_ids", np.array([PROMPTS[0]], np.int64), "INT64")], "max_tokens"),
        "two prompts": ([raw("input_ids", np.array([PROMPTS[0], PROMPTS[1]], np.int64), "INT64"),
                         raw("max_tokens", np.array([[3], [3]], np.int32), "INT32")], "one prompt per request"),
        "top_p": ([raw("input_ids", np.array([PROMPTS[0]], np.int64), "INT64"), n3,
                   raw("top_p", np.array([[0.0]], np.float32), "FP32")], "top_p must be in (0, 1]"),
    }
    for case, (inputs, message) in cases.items():
        got = stream_generate(url, None, 3, raw_inputs=inputs)
        assert isinstance(got, str) and message in got, (case, got)
        assert stream_generate(url, PROMPTS[0], 3) == good, case
    # the logits model over HTTP: same checks, then a good request
    client = th.InferenceServerClient(server.http_url)
    for array, message in ((np.array([[1, vocab + 3]], np.int64), "outside the vocabulary"),
                           (np.zeros((1, 0), np.int64), "input_ids is empty"),
                           (np.ones((1, context + 1), np.int64), f"exceed the model's context of {context}"),
                           (np.array(PROMPTS[0], np.int64), "shape")):
        x = th.InferInput("input_ids", list(array.shape), "INT64")
        x.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException, match=message.replace("[", r"\[").replace("(", r"\(")):
            client.infer(f"{NAME}_logits", [x])
    x = th.InferInput("input_ids", [1, 4], "INT64")
    x.set_data_from_numpy(np.array([PROMPTS[0]], np.int64))
    assert client.infer(f"{NAME}_logits", [x]).as_numpy("logits").shape[:2] == (1, 4)
    client.close()


@pytest.mark.slow
def test_corrupted_checkpoint_fails_to_load_with_its_error(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(server.http_url)
    message = "model.safetensors: sha256 does not match fp_export.json (modified or corrupt)"
    with pytest.raises(InferenceServerException, match=r"sha256 does not match fp_export\.json"):
        client.load_model("broken")
    status = {m["name"]: m for m in client.get_model_repository_index()}
    assert status["broken"]["state"] == "UNAVAILABLE" and message in status["broken"]["reason"]
    assert message in server.log()
    assert client.is_model_ready(NAME) and client.is_server_live()
    client.close()


@pytest.mark.slow
def test_cli_serve_starts_prints_endpoints_and_stops_on_ctrl_c(tmp_path):
    srv.locate()
    (tmp_path / "empty").mkdir()
    exe = Path(sys.executable).with_name("fp-export")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from fp_export.cli import app; app()"]
    p = subprocess.Popen(cmd + ["serve", "--repo", str(tmp_path / "empty"), "--http-port", "0", "--grpc-port", "0",
                                "--log", str(tmp_path / "log")], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "tritonserver ready: HTTP http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=10) as r:
            assert r.status == 200
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "tritonserver stopped (exit code 0)" in rest


def test_cli_deploy_bad_input_exits_2(tmp_path):
    cmd = [sys.executable, "-c", "from fp_export.cli import app; app()"]
    r = subprocess.run(cmd + ["deploy", "--model", str(tmp_path / "missing"), "--repo", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing: no such checkpoint or model directory" in " ".join(r.stderr.split())
    r = subprocess.run(cmd + ["deploy", "--model", str(fx.DEFAULT_MODEL), "--repo", str(tmp_path / "r"),
                              "--backend", "vllm"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown backend 'vllm'" in " ".join(r.stderr.split())
