"""The package's shape: stages import one way only, no import cycle, one owner per concept (the
Fp4ToFp8 op's identity and table constants in the CUDA, TensorRT and Triton code match it), and
the README's Python API example runs as written."""

import ast
import re
from pathlib import Path

import pytest

from fp_export.numerics import fp4_to_fp8 as op

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fp_export"
# each stage may import itself and the stages of a lower rank only
RANK = {"files": 0, "numerics": 0, "data": 1, "hf": 1, "quant": 1, "checkpoint": 2, "evaluate": 2, "ptq": 3, "export": 4,
        "runtime": 5, "build": 6, "validate": 7, "deploy": 8, "api": 9, "": 9, "cli": 10}


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(f: Path) -> set[str]:
    """Every fp_export module imported by ``f``, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("fp_export")}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports(f) if t in mods and t != m and not m.startswith(t + ".")} for m, f in mods.items()}


def test_every_stage_has_a_rank():
    assert {stage(m) for m in modules()} <= set(RANK), "a new stage folder needs a place in RANK"


def test_stages_import_only_lower_stages():
    bad = [f"{m} -> {t}" for m, targets in graph().items() for t in targets if RANK[stage(t)] > RANK[stage(m)]]
    assert not bad, "imports against the stage order:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in g[u]:
            if state.get(v) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in g:
        if m not in state:
            visit(m, [m])


def packed_words() -> tuple[str, str]:
    """The magnitude table as two little-endian 32-bit words, as the kernels hold it."""
    t = op.E4M3_MAGNITUDE
    lo = t[0] | t[1] << 8 | t[2] << 16 | t[3] << 24
    hi = t[4] | t[5] << 8 | t[6] << 16 | t[7] << 24
    return f"0x{lo:08X}", f"0x{hi:08X}"


def test_cuda_and_triton_tables_match_the_op():
    lo, hi = packed_words()
    cu = (ROOT / "plugins" / "fp4_cast.cuh").read_text()  # the table of the cast kernel and the W4A8 GEMM
    assert f"{lo}u" in cu and f"{hi}u" in cu
    for user in ("fp4_to_fp8.cu", "w4a8_gemm.cu"):
        assert '#include "fp4_cast.cuh"' in (ROOT / "plugins" / user).read_text()
    triton = (PKG / "runtime" / "triton_w4a8.py").read_text()
    assert f"add.u32 tlo, x, {lo}" in triton and f"add.u32 thi, x, {hi}" in triton


def test_tensorrt_plugin_identity_matches_the_op():
    cpp = (ROOT / "plugins" / "fp4_to_fp8_plugin.cpp").read_text()
    consts = dict(re.findall(r'constexpr char const\* (k\w+) = "([^"]*)";', cpp))
    assert consts == {"kNAME": op.OP_TYPE, "kVERSION": op.PLUGIN_VERSION, "kNAMESPACE": op.PLUGIN_NAMESPACE}


def test_table_is_the_e4m3_encoding_of_fp4_magnitudes():
    import torch

    mags = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert tuple(mags.to(torch.float8_e4m3fn).view(torch.uint8).tolist()) == op.E4M3_MAGNITUDE


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert (tmp_path / "out" / "w4a8" / "fp_export.json").is_file()
    assert (tmp_path / "out" / "w4a8.onnx").is_file()
