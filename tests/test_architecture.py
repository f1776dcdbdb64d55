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
    cu = (ROOT / "plugins" / "fp4_cast.cuh").read_text()  # the table of the cast kernel
    assert f"{lo}u" in cu and f"{hi}u" in cu
    assert '#include "fp4_cast.cuh"' in (ROOT / "plugins" / "fp4_to_fp8.cu").read_text()
    triton = (PKG / "runtime" / "triton_w4a8.py").read_text()
    assert f"add.u32 tlo, x, {lo}" in triton and f"add.u32 thi, x, {hi}" in triton


def test_w4a8_layout_is_the_kernels_wgmma_fragment():
    """The CUDA ``decode`` (its two lines, emulated here) turns the layout words ``prepare`` writes into
    E5M2 bytes (checked with torch.float8_e5m2) equal to each code's E2M1 value times 2^-14, in
    wgmma's register fragment order: lane 4g + t, step j, registers (row g, k 4t + i), (row g + 8,
    k 4t + i), (row g, k 16 + 4t + i), (row g + 8, k 16 + 4t + i) of the step's 32 codes; and
    ``group_scale`` builds 2^(14 + shift) as float bits. Every code pair a byte can hold occurs."""
    import torch

    from fp_export.numerics.formats import FP4_E2M1, decode, pack_nibbles
    from fp_export.runtime import w4a8_gemm as W

    src = (ROOT / "plugins" / "w4a8_gemm.cu").read_text()
    assert "lo = w & 0x8E8E8E8Eu;" in src and "hi = ((w >> 3) & 0x0E0E0E0Eu) | ((w << 7) & 0x80808080u);" in src
    assert "return __int_as_float((shift + 141) << 23);" in src
    n, k = 32, 512
    codes = torch.arange(n * k, dtype=torch.int64).view(n, k)
    codes = ((codes * 7 + codes // 16 * 3) % 16).to(torch.uint8)  # all 256 (code, code + 16 k) pairs
    w = W.prepare(pack_nibbles(codes), torch.zeros(n, k // 128, dtype=torch.int8), 128, torch.ones(n))
    words = w.wt.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # [T, c, h, lane, j]
    lo = words & 0x8E8E8E8E
    hi = ((words >> 3) & 0x0E0E0E0E) | ((words << 7) & 0x80808080)
    as_e5m2 = lambda x: (x.to(torch.int32).view(-1, 1) >> torch.tensor([0, 8, 16, 24]) & 255).to(torch.uint8)  # noqa: E731
    got = torch.stack([as_e5m2(x).view(torch.float8_e5m2).float().view(*x.shape, 4) for x in (lo, hi)], 5)
    got = got * 2.0**14  # [T, c, h, g * 4 + t, j, lo/hi, i]
    got = got.view(n // 16, k // 128, 2, 8, 4, 4, 2, 4).permute(0, 2, 3, 1, 5, 6, 4, 7).reshape(n, k)
    assert torch.equal(got, decode(codes, FP4_E2M1))
    for shift in range(-5, 7):
        assert torch.tensor((shift + 141) << 23, dtype=torch.int32).view(torch.float32).item() == 2.0 ** (14 + shift)


def test_fp16_placement_is_the_fp4_value_times_2_pow_minus_14():
    """An E2M1 code s|e1 e0 m placed as FP16 bits s << 15 | (e1 e0 m) << 9 (the W4A8 kernel's
    decode) is the code's value times 2^-14: all 16 codes, against ml_dtypes' float4_e2m1fn."""
    import ml_dtypes
    import numpy as np

    codes = np.arange(16, dtype=np.uint16)
    fp16 = (((codes & 7) << 9) | ((codes >> 3) << 15)).view(np.float16).astype(np.float64)
    fp4 = codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    assert np.array_equal(fp16 * 2.0**14, fp4)


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
