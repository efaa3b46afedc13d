"""softxent.torch.hf on tiny randomly initialised Hugging Face models (built from a config, no download):
loss and every parameter's gradient equal the model's own ``labels=`` path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from softxent.torch.hf import (  # noqa: E402
    CausalLMWithFusedLoss,
    causal_lm_loss,
    causal_lm_loss_function,
)

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(seed=1, B=3, T=11, V=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100          # a prompt without loss
    labels[2, -3:] = -100         # padding
    return ids, labels


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=TOL):
    (la, ga), (lb, gb) = a, b
    assert abs(float(la) - float(lb)) <= tol * abs(float(lb))
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        scale = float(gb[name].abs().max()) or 1.0
        assert float((ga[name] - gb[name]).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("with_items", [False, True])
def test_causal_lm_loss_equals_model_loss(tie, with_items):
    model = tiny_llama(tie=tie)
    ids, labels = batch()
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    kw = {"num_items_in_batch": torch.tensor(40)} if with_items else {}
    theirs = loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss)
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels, attention_mask=mask,
                                                        impl="chunked", max_chunk_bytes=8 * 97 * 4, **kw))
    assert_same(ours, theirs)


def test_shift_labels_and_wrapper_module():
    model = tiny_llama(seed=2)
    ids, labels = batch(seed=3)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    theirs = loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, shift_labels=shifted))
    assert_same(ours, theirs)
    wrapper = CausalLMWithFusedLoss(model, impl="chunked")
    out = wrapper(input_ids=ids, labels=labels)
    assert out.logits is None
    assert_same(loss_and_grads(model, lambda: wrapper(input_ids=ids, labels=labels).loss), theirs)
    assert wrapper(input_ids=ids).logits.shape == (3, 11, 97)     # no labels: the model itself


def test_gradient_accumulation_with_num_items_in_batch():
    model = tiny_llama(seed=4)
    ids, labels = batch(seed=5, B=4)
    n_items = int((labels[:, 1:] != -100).sum())
    full = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    model.zero_grad(set_to_none=True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = causal_lm_loss(model, ids[rows], labels[rows], num_items_in_batch=n_items)
        part.backward()
        total += float(part.detach())
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same((torch.tensor(total), accumulated), full)


def test_softcapped_model():
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma 2")
    torch.manual_seed(6)
    cfg = transformers.Gemma2Config(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                    max_position_embeddings=64, final_logit_softcapping=2.0,
                                    query_pre_attn_scalar=16)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids, labels = batch(seed=7)
    theirs = loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert_same(ours, theirs)


def test_loss_function_hook():
    model = tiny_llama(seed=8)
    ids, labels = batch(seed=9)
    theirs = loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    items = loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, num_items_in_batch=33).loss)
    model.loss_function = causal_lm_loss_function
    assert_same(loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss), theirs)
    assert_same(loss_and_grads(model, lambda: model(input_ids=ids, labels=labels,
                                                    num_items_in_batch=33).loss), items)
    all_ignored = torch.full_like(labels, -100)
    loss = model(input_ids=ids, labels=all_ignored).loss
    assert float(loss.detach()) == 0.0   # the default hook gives NaN here


@pytest.mark.parametrize("num_items", [None, 29])
def test_loss_function_hook_with_shift_labels(num_items):
    """causal_lm_loss_function(shift_labels=...) with the labels pre-shifted equals passing ``labels``
    (loss and logits gradient), equals transformers' ForCausalLMLoss and the float64 reference; and
    through a model's hook, ``shift_labels`` wins over ``labels`` and gives the ``labels=`` loss and
    parameter gradients."""
    import numpy as np

    import softxent.loss as ref_loss
    from transformers.loss.loss_utils import ForCausalLMLoss

    V = 97
    ids, labels = batch(seed=10)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    logits = torch.randn(3, 11, V, generator=torch.Generator().manual_seed(11)) * 3
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for fn, args in ((causal_lm_loss_function, {"labels": labels}),
                     (causal_lm_loss_function, {"labels": None, "shift_labels": shifted}),
                     (ForCausalLMLoss, {"labels": None, "shift_labels": shifted.contiguous()})):
        z = logits.clone().requires_grad_()
        loss = fn(z, vocab_size=V, **args, **kw)
        loss.backward()
        results.append((loss.detach(), z.grad))
    ref_kw = {"reduction": "mean"} if num_items is None else {"reduction": "sum",
                                                              "grad_output": np.asarray(1.0 / num_items)}
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(logits.double().numpy(), shifted.numpy(),
                                                            **ref_kw)
    want_loss = want_loss if num_items is None else want_loss / num_items
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert abs(float(results[1][0]) - float(want_loss)) <= TOL * abs(float(want_loss))
    assert float((results[1][1].double() - torch.from_numpy(want_grad)).abs().max()) <= (
        TOL * np.abs(want_grad).max())
    assert torch.allclose(results[1][0], results[2][0], rtol=TOL)
    assert torch.allclose(results[1][1], results[2][1], rtol=0, atol=TOL * float(results[2][1].abs().max()))

    model = tiny_llama(seed=12)
    model.loss_function = causal_lm_loss_function
    with_labels = loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, **kw).loss)
    decoy = torch.full_like(labels, -100)           # the model calls its hook only when labels is given
    with_shifted = loss_and_grads(model, lambda: model(input_ids=ids, labels=decoy, shift_labels=shifted,
                                                       **kw).loss)
    assert_same(with_shifted, with_labels)


def test_bad_models_and_arguments():
    model = tiny_llama()
    ids, labels = batch()
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_loss(model, ids)
    with pytest.raises(TypeError, match="separate body"):
        causal_lm_loss(model.model, ids, labels)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"config.logit_scale = 0.5"):
        causal_lm_loss(model, ids, labels)
