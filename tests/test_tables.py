"""The table tools' bookkeeping on synthetic rows (no quantization): tools/paper_table.py names the
machine of each row and cross-checks rows of another run; tools/study_table.py sets a study row
beside its base only when both come from the same machine and protocol."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import paper_table  # noqa: E402
import study_table  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study_recipes"


def row(recipe, ppl, device="GPU: H100, torch 2.11", tokens=51200, calibration="128x2048", sha="abc"):
    return {"recipe": recipe, "perplexity": ppl, "tokens": tokens, "seqlen": 2048, "calibration": calibration,
            "calibration_tokens_sha256": sha, "seconds": 10.0, "cpu_seconds": 9.0, "device": device}


def test_markdown_names_one_machine_or_a_column_and_cross_checks():
    rows = [row("w16a16", 16.0, calibration="none"), row("w8a8-fp8", 16.2)]
    md = paper_table.markdown(rows, "m")
    assert "Machine: GPU: H100, torch 2.11;" in md and "| w8a8-fp8 | 16.200 | +1.25% |" in md
    assert "machine |" not in md
    mixed = paper_table.markdown(rows + [row("w8a8-int8", 16.4, device="CPU: EPYC")], "m")
    assert "Machine:" not in mixed and "| CPU: EPYC |" in mixed
    cross = paper_table.markdown(rows, "m", [row("w16a16", 15.9, device="CPU: EPYC", calibration="none")])
    assert "Cross-check, w16a16: 16.0000 here (GPU: H100, torch 2.11) vs 15.9000 on CPU: EPYC (+0.629%)" in cross
    with pytest.raises(SystemExit, match="cross-check row w16a16: evaluated on 1024 tokens"):
        paper_table.markdown(rows, "m", [row("w16a16", 15.9, tokens=1024)])


def test_write_atomic_leaves_no_temporary(tmp_path):
    paper_table.write_atomic(tmp_path / "a.json", "x")
    paper_table.write_atomic(tmp_path / "a.json", b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and (tmp_path / "a.json").read_text() == "y"


def test_study_rows_beside_their_base_and_refused_across_machines():
    index = {"w4a8-fp4-m2-lorc-r16.yaml": {"base": "w4a8-fp4-m2-lorc", "option": ["lorc.rank"]}}
    bases = [row("w16a16", 16.0, calibration="none", sha="x"), row("w4a8-fp4-m2-lorc", 18.0)]
    (out,) = study_table.table([row("w4a8-fp4-m2-lorc-r16", 17.1)], bases, index, STUDY)
    assert out["base"] == "w4a8-fp4-m2-lorc" and out["change"] == "lorc.rank: 8 -> 16"
    assert out["vs_base_pct"] == pytest.approx(-5.0) and out["vs_w16a16_pct"] == pytest.approx(6.875)
    with pytest.raises(SystemExit, match="device 'CPU' differs from its base w4a8-fp4-m2-lorc's"):
        study_table.table([row("w4a8-fp4-m2-lorc-r16", 17.1, device="CPU")], bases, index, STUDY)
    with pytest.raises(SystemExit, match="calibration_tokens_sha256 'def' differs"):
        study_table.table([row("w4a8-fp4-m2-lorc-r16", 17.1, sha="def")], bases, index, STUDY)


def test_study_change_names_the_overridden_layers():
    c = study_table.change(STUDY / "w4a8-fp4-m2-lorc-fp8down2.yaml", "w4a8-fp4-m2-lorc")
    assert c == r"overrides: none -> /layers\.[01]\.mlp\.down_proj$/ -> weights=fp8_e4m3, lorc=none"
    assert json.dumps(c)
