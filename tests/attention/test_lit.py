"""LiT's formula against the forms it is labelled with: FLatten-Transformer's normalised
linear attention and the paper's plain ReLU, each restated here independently."""

from __future__ import annotations

import json

import pytest
import torch

from attnbench import attention
from attnbench.attention import Layout
from attnbench.attention.lit import chunked
from tests.helpers import qkv

LIT = attention.get("lit")


def flatten_form(q, k, v):
    """LeapLabTHU/FLatten-Transformer models/flatten_swin.py FocusedLinearAttention,
    restated without its focusing function (power 1, scale 1) and without the conv."""
    n = k.shape[-2]
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
    return q @ kv * z


def test_lit_is_flattens_normalised_form(gen):
    q, k, v = (torch.randn(2, 3, 50, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    out = LIT.attend(q, k, v, grid=(5, 10), impl="reference")
    torch.testing.assert_close(out, flatten_form(q, k, v), rtol=1e-12, atol=1e-15)


def test_phi_shift_zero_is_the_papers_plain_relu(gen):
    q, k, v = (torch.randn(1, 2, 36, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    q = q.abs() + 0.1  # every query sees some positive key feature: the plain form is defined
    fq, fk = torch.relu(q), torch.relu(k)
    plain = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2, keepdim=True).transpose(-1, -2))
    out = LIT.attend(q, k, v, grid=(6, 6), impl="reference", phi_shift=0.0, eps=1e-300)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-15)
    default = LIT.attend(q, k, v, grid=(6, 6), impl="reference")
    assert not torch.allclose(default, plain, rtol=1e-12, atol=1e-15)  # the two forms differ


def test_labels_never_claim_official_lit_code():
    text = json.dumps(LIT.describe())
    assert "official LiT code" not in text and "FLatten" in text
    assert "no LiT code is public" in " ".join(LIT.describe()["notes"])


@pytest.mark.parametrize("layout", [Layout((10, 15)), Layout((6, 9), text=7, text_first=False),
                                    Layout((2, 4, 6), text=12)], ids=lambda lay: lay.describe())
def test_chunked_in_several_chunks_matches_the_reference(layout, gen, monkeypatch):
    """The CPU path in chunks of 7 tokens (a partial last one), forward and backward, and
    without autograd, against the float64 reference; and in the one chunk it takes when
    the tokens fit its budget."""
    q, k, v = (t.requires_grad_() for t in qkv(gen, 2, 3, layout.tokens, 8))
    weight = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    results = {}
    for impl, tokens in (("reference", None), ("chunked", None), ("chunked", 7)):
        if tokens:
            monkeypatch.setattr(chunked, "chunk_tokens", lambda *_, n=tokens: n)
        out = LIT.attend(q, k, v, layout=layout, impl=impl)
        results[impl, tokens] = (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))
        with torch.inference_mode():
            torch.testing.assert_close(LIT.attend(q, k, v, layout=layout, impl=impl), out,
                                       rtol=1e-13, atol=1e-13)
    for got in (results["chunked", None], results["chunked", 7]):
        for a, b in zip(got, results["reference", None], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
