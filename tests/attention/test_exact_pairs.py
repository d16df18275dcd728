"""exact_pairs: the pairs a method computes exactly, in the call's token order.

Checked against the method itself: softmax restricted to those pairs is CLEAR's
output and SLA's sparse branch, on every layout kind (text last included)."""

import pytest
import torch

from attnbench import attention
from attnbench.attention import Layout

LAYOUTS = [Layout((4, 6)), Layout((4, 6), text=5), Layout((4, 6), text=5, text_first=False),
           Layout((2, 4, 4), text=3, text_first=False)]


def qkv(layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, layout.tokens, 8, generator=gen, dtype=torch.float64)
            for _ in range(3)]


def masked_softmax(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def full_mask(rows, n, chunk=7):
    return torch.cat([rows(r0, min(n, r0 + chunk)).expand(2, 2, -1, n)
                      for r0 in range(0, n, chunk)], dim=-2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_clear_pairs_give_its_output(layout):
    q, k, v = qkv(layout)
    clear = attention.get("clear")
    rows = clear.exact_pairs(q, k, layout, radius=2.5)
    mask = full_mask(rows, layout.tokens)
    expected = clear.attend(q, k, v, layout=layout, radius=2.5, impl="reference")
    assert torch.allclose(masked_softmax(q, k, v, mask), expected, atol=1e-12)
    assert mask.float().mean().item() == pytest.approx(clear.density(layout, radius=2.5))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_sla_pairs_give_its_sparse_branch(layout):
    q, k, v = qkv(layout, seed=1)
    sla = attention.get("sla")
    opts = {"block_q": 4, "block_kv": 4, "topk": 0.3}
    mask = full_mask(sla.exact_pairs(q, k, layout, **opts), layout.tokens)
    sparse, _ = sla.attend_parts(q, k, v, layout=layout, impl="reference", **opts)
    assert torch.allclose(masked_softmax(q, k, v, mask), sparse, atol=1e-12)


def test_exact_and_linear_methods():
    layout = Layout((3, 4), text=2)
    q, k, _ = qkv(layout)
    assert full_mask(attention.get("softmax").exact_pairs(q, k, layout), 14).all()
    assert attention.get("lit").exact_pairs(q, k, layout) is None
    with pytest.raises(ValueError, match="tokens"):
        attention.get("clear").exact_pairs(q[..., :5, :], k[..., :5, :], layout)
