"""M-RoPE models cache ``rope_deltas`` on the model between calls (HF's Qwen2-VL family, Qwen3-VL,
Qwen3-VL-MoE, Qwen3.5): a value left by one call must never reach the next. Every runner here
passes explicit position ids, so a run or a generation after another call on other inputs (other
image sizes, another batch size), even with a wrong value planted in ``rope_deltas``, equals the
same call on a fresh model."""
from __future__ import annotations

import pytest
import torch

import interp
from interp import tiny

MROPE = ["qwen2vl", "qwen25vl", "qwen3vl", "qwen3vl_moe", "qwen35"]


def _inputs(m, sizes, text="what is this ?"):
    return m.inputs([tiny.image(h, w, seed=k) for k, (h, w) in enumerate(sizes)], [m.prompt(text)] * len(sizes))


@pytest.mark.parametrize("name", MROPE)
def test_no_stale_rope_deltas(name):
    fresh = interp.load(*tiny.BUILDERS[name]())
    used = interp.load(*tiny.BUILDERS[name]())
    a = _inputs(used, [(64, 48), (48, 64), (64, 64)])  # three rows, other grids
    b = _inputs(used, [(32, 48)])
    with torch.no_grad():
        want_run = fresh.run(b, last_only=True)[:, -1]
        want_gen = fresh.generate(b, max_new_tokens=3)
        used.generate(a, max_new_tokens=3)  # a call on other inputs first
        inner = getattr(used.model, "model", used.model)
        assert hasattr(inner, "rope_deltas")
        inner.rope_deltas = torch.full((3, 1), 37)  # and a stale value planted where HF keeps it
        got_run = used.run(b, last_only=True)[:, -1]
        got_gen = used.generate(b, max_new_tokens=3)
    torch.testing.assert_close(got_run, want_run, rtol=0, atol=1e-5)
    assert torch.equal(got_gen, want_gen)
