"""The streamed validation statistics equal the whole-array computation they replace."""

import numpy as np
import torch
import torch.nn.functional as F

from fp_export.validate import compare as validate
from fp_export.validate.compare import _Stats, _window_nll


def test_chunked_stats_match_whole_array_reference(monkeypatch):
    monkeypatch.setattr(validate, "CHUNK_ROWS", 7)  # windows of 30 positions: ragged last chunk
    gen = np.random.default_rng(0)
    ref = gen.normal(size=(3, 30, 50)) * 4
    got = ref + gen.normal(size=ref.shape) * 0.5
    ids = gen.integers(0, 50, size=(3, 30))
    stats = _Stats()
    top_ref = np.concatenate([stats.add(got[:2], ref[:2], ids[:2]), stats.add(got[2:], ref[2:], ids[2:])])
    assert stats.abs_err == np.abs(got - ref).max() and stats.ref_max == np.abs(ref).max()
    assert np.array_equal(top_ref, ref.argmax(-1))
    assert stats.top1_hits == (got.argmax(-1) == ref.argmax(-1)).sum() and stats.positions == ids.size
    whole = lambda lg: float(sum(F.cross_entropy(torch.from_numpy(lg[b, :-1]), torch.from_numpy(ids[b, 1:]),  # noqa: E731
                                                 reduction="sum") for b in range(3)))
    assert abs(stats.nll - whole(got)) < 1e-9 * whole(got)
    assert abs(stats.nll_ref - whole(ref)) < 1e-9 * whole(ref)
    assert abs(_window_nll(got[0], ids[0]) - float(F.cross_entropy(
        torch.from_numpy(got[0, :-1]), torch.from_numpy(ids[0, 1:]), reduction="sum"))) < 1e-9


def test_float32_rule_passes_a_rounding_realization_and_fails_a_wrong_weight():
    """Against the default model (W16A8-FP8, the flips-prone case): a copy whose weights are
    nudged by one ulp (another seed than the floor's) passes; a copy with one linear scaled by 2
    (an exponent off by one) fails."""
    import copy

    from fp_export.data.corpus import load_text
    from fp_export.evaluate.perplexity import eval_windows, tokenize
    from fp_export.hf.loading import DEFAULT_MODEL, load_model
    from fp_export.ptq.sequential import quantize_model
    from fp_export.quant.recipe import load_recipe
    from fp_export.validate.compare import _weights, compare
    from fp_export.validate.runners import TorchRunner

    model, tok, _ = load_model(DEFAULT_MODEL)
    ids = tokenize(tok, load_text("test"))
    quantize_model(model, load_recipe("w16a8-fp8"), ids[:64][None])
    windows = eval_windows(ids, 256, 4)
    nudged, wrong = copy.deepcopy(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for t in _weights(nudged):
            up = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.bool)
            t.copy_(torch.nextafter(t, torch.where(up, float("inf"), float("-inf"))))
        wrong.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(2.0)
    ok = compare(TorchRunner(nudged, name="nudged"), TorchRunner(model, name="ref"), windows, floor_model=model)
    bad = compare(TorchRunner(wrong, name="wrong"), TorchRunner(model, name="ref"), windows, floor_model=model)
    assert ok["passed"] and len(ok["noise_floor"]) == 3, ok
    assert not bad["passed"], bad
