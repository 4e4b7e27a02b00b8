"""SparseK as a transformers attention implementation, on a tiny Llama (CPU, float32).

transformers is imported directly: it is in the ``test`` extra, so under CI a missing install
fails here instead of skipping.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sparsek.integrations.transformers import SCORER_ATTR, attach_scorers, register

S, VOCAB = 32, 100


def tiny_config(attn: str) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        attn_implementation=attn,
    )


def sparsek_model(topk: int, window: int, seed: int = 0):
    name = register(topk=topk, window=window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation=name, dtype=torch.float32)
    attach_scorers(model)
    return model


def tokens(B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def test_forward_backward_trains_the_scorers():
    model = sparsek_model(topk=8, window=4)
    scorers = [m for m in model.modules() if m.__class__.__name__ == "SparseKValueScorer"]
    assert len(scorers) == 2  # one per layer
    assert any(SCORER_ATTR in k for k in model.state_dict())  # saved with the model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = tokens()
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for scorer in scorers:
        assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0
        assert scorer.slope.grad is not None
    before = scorers[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, scorers[0].weight)


@pytest.mark.parametrize("window", [0, 5, S])
def test_full_topk_equals_eager(window):
    model = sparsek_model(topk=S, window=window).eval()
    torch.manual_seed(123)
    eager = AutoModelForCausalLM.from_config(tiny_config("eager"), attn_implementation="eager", dtype=torch.float32).eval()
    missing, unexpected = eager.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(SCORER_ATTR in k for k in unexpected)
    ids = tokens()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = eager(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_topk_differs_from_eager():
    # Guards the test above: with few keys kept the model is no longer dense attention.
    model = sparsek_model(topk=2, window=2).eval()
    eager = AutoModelForCausalLM.from_config(tiny_config("eager"), attn_implementation="eager", dtype=torch.float32).eval()
    eager.load_state_dict(model.state_dict(), strict=False)
    ids = tokens()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-4)


def test_generate_with_and_without_cache_agree():
    model = sparsek_model(topk=6, window=3).eval()
    prompt = tokens(B=1)[:, :12]
    no_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert no_cache.shape == (1, 20)
    assert torch.equal(no_cache, with_cache)


def _eager_twin(model):
    torch.manual_seed(123)
    eager = AutoModelForCausalLM.from_config(tiny_config("eager"), attn_implementation="eager", dtype=torch.float32).eval()
    eager.load_state_dict(model.state_dict(), strict=False)
    return eager


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(side):
    """Each padded sequence gives, at its real tokens, what it gives unpadded (sparse topk), and with
    topk >= S the padded batch equals eager attention at the real tokens."""
    model = sparsek_model(topk=6, window=3).eval()
    ids = tokens(B=3)
    lengths = [S, S - 5, 7]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, S - n :] = 1 if side == "left" else 0
        if side == "right":
            mask[b, :n] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        for b, n in enumerate(lengths):
            real = slice(S - n, S) if side == "left" else slice(0, n)
            alone = model(input_ids=ids[b : b + 1, real]).logits[0]
            torch.testing.assert_close(got[b, real], alone, rtol=1e-5, atol=1e-5)
    dense = sparsek_model(topk=S, window=0).eval()
    with torch.no_grad():
        got = dense(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        want = _eager_twin(dense)(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_batched_generation_with_left_padding_matches_one_by_one():
    model = sparsek_model(topk=6, window=3).eval()
    prompts = [tokens(B=1, seed=2)[0, :12], tokens(B=1, seed=3)[0, :8]]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 12 - len(p) :], mask[b, 12 - len(p) :] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(p.view(1, -1), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[b, 12:], alone[0, len(p) :])


def test_a_mask_with_a_hole_is_refused():
    model = sparsek_model(topk=8, window=4)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # a masked token between real ones: not padding
    with pytest.raises(ValueError, match="left or right padding only"):
        model(input_ids=ids, attention_mask=mask)


def test_lazy_scorer_warns():
    name = register(topk=8, window=4)
    model = AutoModelForCausalLM.from_config(tiny_config(name), attn_implementation=name)
    import sparsek.integrations.transformers as integ

    integ._warned_lazy = False
    with pytest.warns(RuntimeWarning, match="attach_scorers"):
        model(input_ids=tokens())
    assert sum(hasattr(m, SCORER_ATTR) for m in model.modules()) == 2
