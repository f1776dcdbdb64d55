"""The public API beyond the README example: loading both kinds of directory, calibration
overrides, generation (greedy, sampled, streamed, stopped at EOS) and its input errors."""

import pytest
import torch

import fp_export as fx
from fp_export.runtime.generate import next_tokens


@pytest.fixture(scope="module")
def qm(quantized):
    return fx.load(quantized("w4a8-fp4-m2-lorc"))


def test_load_both_kinds_of_directory(qm):
    assert qm.manifest is not None and qm.recipe.name == "w4a8-fp4-m2-lorc"
    plain = fx.load(fx.DEFAULT_MODEL)
    assert plain.manifest is None and plain.recipe is None and plain.metrics == {}


def test_api_names_survive_importing_the_stage_packages():
    import fp_export.deploy.server  # noqa: F401
    import fp_export.evaluate.perplexity  # noqa: F401
    import fp_export.validate.compare  # noqa: F401

    assert all(callable(getattr(fx, n)) for n in ("evaluate", "validate", "deploy", "serve", "generate"))


def test_quantize_applies_calibration_overrides(tmp_path):
    q = fx.quantize(fx.DEFAULT_MODEL, "w8a8-fp8", out=tmp_path / "q", calibration={"nsamples": 2, "seqlen": 64},
                    evaluate=False)
    assert q.manifest["calibration"]["nsamples"] == 2 and q.manifest["calibration"]["seqlen"] == 64
    assert q.manifest["recipe"]["calibration"]["nsamples"] == 2


def test_greedy_generation_equals_full_recompute(qm):
    ids = qm.tokenizer("In the beginning God created", return_tensors="pt")["input_ids"]
    streamed = []
    new = fx.generate(qm, ids.repeat(2, 1), 12, device="cpu", on_token=lambda i, t: streamed.append((i, t.clone())))
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, qm.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new[0], seq[0, ids.shape[1]:]) and torch.equal(new[0], new[1])
    assert [i for i, _ in streamed] == list(range(12))
    assert torch.equal(torch.stack([t for _, t in streamed], dim=1), new)


def test_sampling_is_seeded_and_top_k_1_is_greedy(qm):
    ids = qm.tokenizer("And the earth", return_tensors="pt")["input_ids"]
    kw = dict(temperature=1.0, top_p=0.9, device="cpu")
    a = fx.generate(qm, ids, 16, seed=3, **kw)
    assert torch.equal(a, fx.generate(qm, ids, 16, seed=3, **kw))
    assert not torch.equal(a, fx.generate(qm, ids, 16, seed=4, **kw))
    greedy = fx.generate(qm, ids, 8, device="cpu")
    assert torch.equal(fx.generate(qm, ids, 8, temperature=0.7, top_k=1, seed=0, device="cpu"), greedy)


def test_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, 1.0, 0, 0.8, gen)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn


def test_generation_stops_at_eos(qm):
    ids = qm.tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    first = int(fx.generate(qm, ids, 1, device="cpu")[0, 0])
    out = fx.generate(qm, ids, 10, eos_token_id=first, device="cpu")
    assert out.tolist() == [[first]]


@pytest.mark.parametrize("ids,n,match", [
    (torch.zeros(1, 0, dtype=torch.long), 4, "seq >= 1"),
    (torch.tensor([[1, 4096]]), 4, r"token ids must be in \[0, 4096\)"),
    (torch.tensor([[1, 2]]), 600, "exceeds the model's context of 512"),
    (torch.tensor([[1, 2]]), 0, "max_new_tokens must be >= 1"),
])
def test_generation_input_errors(qm, ids, n, match):
    with pytest.raises(ValueError, match=match):
        fx.generate(qm, ids, n, device="cpu")
