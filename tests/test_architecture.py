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


def test_w4a8_layout_bits_are_the_kernels_decode():
    """``w4a8_gemm.MAG_AT``/``SIGN_AT`` (the layout ``prepare`` writes) against the shifts of the
    CUDA ``decode``: pair p's codes land on FP16 bits 9-11 / 15 and 25-27 / 31 of its register."""
    from fp_export.runtime.w4a8_gemm import MAG_AT, SIGN_AT

    src = (ROOT / "plugins" / "w4a8_gemm.cu").read_text()
    assert "MAG = 0x0E000E00u, SIGN = 0x80008000u" in src
    lines = re.findall(r"^\s+o\[(\d)\] = (.*);$", src, re.M)
    assert [int(i) for i, _ in lines] == [0, 1, 2, 3]
    for p, (_, expr) in enumerate(lines):
        if m := re.fullmatch(r"\(?w(?: << (\d+)\))? & \(MAG \| SIGN\)", expr):
            a = b = int(m.group(1) or 0)
        else:
            m = re.fullmatch(r"\(\(w << (\d+)\) & MAG\) \| \(\(w << (\d+)\) & SIGN\)", expr)
            a, b = int(m.group(1)), int(m.group(2))
        assert (MAG_AT[2 * p], MAG_AT[2 * p + 1], SIGN_AT[2 * p], SIGN_AT[2 * p + 1]) == (9 - a, 25 - a, 15 - b, 31 - b)
    assert sorted([b for m in MAG_AT for b in range(m, m + 3)] + list(SIGN_AT)) == list(range(32))


def test_wide_kernel_weight_scaling_is_exact_and_tiles_agree():
    """The wide W4A8 kernel multiplies each decoded FP16 weight (value * 2^-14) by the FP16 2^shift
    it builds as bits (shift + 15) << 10: exact for every code and legal shift (numpy's float16
    multiply rounds to nearest even, as mul.rn.f16x2); and the Python split rule's tiles per CTA
    are the kernel's."""
    import numpy as np

    from fp_export.numerics.fp4_to_fp8 import SHIFT_MAX, SHIFT_MIN
    from fp_export.runtime.w4a8_gemm import WIDE_TILES

    src = (ROOT / "plugins" / "w4a8_gemm.cu").read_text()
    assert "const uint32_t h = static_cast<uint32_t>(shift + 15) << 10;" in src
    assert re.search(r"#define FPX_WIDE_WARPS (\d+)", src).group(1) == str(WIDE_TILES)
    codes = np.arange(16, dtype=np.uint16)
    w = (((codes & 7) << 9) | ((codes >> 3) << 15)).view(np.float16)
    for shift in range(SHIFT_MIN, SHIFT_MAX + 1):
        s = np.array([(shift + 15) << 10], dtype=np.uint16).view(np.float16)
        assert s[0] == 2.0**shift
        assert np.array_equal((w * s).astype(np.float64), w.astype(np.float64) * 2.0**shift), shift


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
