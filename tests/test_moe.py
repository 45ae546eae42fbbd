"""Qwen3-VL-MoE's router and expert sites (interp/adapters/qwen3_vl_moe.py) on the tiny MoE model:
``lm.blocks.{i}.router`` is the router logits HF records (``output_router_logits=True``) and the
gate's linear map of its input; writing it re-routes the tokens (the expert weights and indices
are recomputed from the written logits), checked against a hand-computed MoE block; the sites
exist on MoE blocks only."""
import pytest
import torch

import interp
from interp import tiny
from interp.tracing import trace


@pytest.fixture(scope="module")
def moe():
    m = interp.load(*tiny.build_qwen3vl_moe())
    inputs = m.inputs([tiny.image(seed=0), tiny.image(40, 60, seed=1)],
                      [m.prompt("describe the image ?"), m.prompt("what is this a picture of ?")])
    return m, inputs


def test_router_site_is_hfs_router_logits_and_the_gates_linear_map(moe):
    m, inputs = moe
    r = m.adapter.routing(m.model)
    assert r.layers == (0, 1) and (r.experts, r.top_k) == (4, 2)
    sites = [f"lm.blocks.{i}.router" for i in r.layers] + [f"lm.blocks.{i}.router#input" for i in r.layers]
    t = trace(m, inputs, cache=sites)
    with torch.no_grad():
        hf = m.model(**inputs, output_router_logits=True)
    B, L = inputs["input_ids"].shape
    for j, i in enumerate(r.layers):
        got = t.cache[f"lm.blocks.{i}.router"]
        assert got.shape == (B * L, r.experts)
        assert torch.equal(got, hf.router_logits[j])
        w = m.model.model.language_model.layers[i].mlp.gate.weight  # (E, D)
        x = t.cache[f"lm.blocks.{i}.router#input"]  # (B·L, D): the post-attention norm's output
        torch.testing.assert_close(got, x @ w.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(t.logits, hf.logits)  # caching changes nothing
    dense = interp.load(*tiny.build_qwen3vl())
    assert dense.adapter.routing(dense.model) is None  # a dense LM has no routing


def _expert(mlp, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a MoE block by hand: SwiGLU with its stacked weights, (N, D) → (N, D)."""
    ex = mlp.experts
    gate, up = (x @ ex.gate_up_proj[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ ex.down_proj[e].T


def test_writing_the_router_reroutes_the_tokens(moe):
    """Logits forcing every token onto experts 2 and 3 (equal weights 1/2): the experts' output is
    ½ expert 2 + ½ expert 3 of each token's input, by hand; the logits change; a write that changes
    nothing leaves them bit-identical; the escape hatch to the gate's module path does the same."""
    m, inputs = moe
    site = "lm.blocks.0.router"

    def force(z):
        return torch.tensor([-30.0, -30.0, 30.0, 30.0], dtype=z.dtype).expand_as(z).clone()

    base = trace(m, inputs, cache=["lm.blocks.0.experts"])
    t = trace(m, inputs, edits={site: force}, cache=[f"{site}#input", "lm.blocks.0.experts", site])
    x = t.cache[f"{site}#input"]
    mlp = m.model.model.language_model.layers[0].mlp
    want = 0.5 * _expert(mlp, 2, x) + 0.5 * _expert(mlp, 3, x)
    torch.testing.assert_close(t.cache["lm.blocks.0.experts"], want, rtol=1e-4, atol=1e-5)
    assert (base.cache["lm.blocks.0.experts"] - want).abs().max() > 1e-3  # the tokens were routed elsewhere
    assert torch.equal(t.cache[site], force(t.cache[site]))  # the cache sees the written logits
    assert (t.logits - base.logits).abs().max() > 1e-4
    same = trace(m, inputs, edits={site: lambda z: z.clone()}).logits
    assert torch.equal(same, base.logits)
    path = m.adapter.path(site, m.model)
    hatch = trace(m, inputs, edits={f"module:{path}": force}).logits
    assert torch.equal(hatch, t.logits)


def test_complete_output_leaves_other_modules_alone(moe):
    m, _ = moe
    out = (torch.zeros(3, 4), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.long))
    assert m.adapter.complete_output(m.model, "model.language_model.layers.0.self_attn", out) is out
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    _, w, idx = m.adapter.complete_output(m.model, "model.language_model.layers.1.mlp.gate", (logits, None, None))
    p = torch.softmax(logits, -1)[0]
    assert idx.tolist() == [[2, 3]]
    torch.testing.assert_close(w, (p[[2, 3]] / p[[2, 3]].sum())[None], rtol=1e-6, atol=1e-7)


def test_router_sites_exist_on_moe_blocks_only():
    """With block 1 dense (``mlp_only_layers=[1]``) its MLP has no router or experts: the adapter
    lists neither site for it, and routing names block 0 only."""
    from transformers import Qwen3VLMoeForConditionalGeneration
    model, proc = tiny.build_qwen3vl_moe()
    cfg = model.config
    cfg.text_config.mlp_only_layers = [1]
    dense = interp.load(Qwen3VLMoeForConditionalGeneration(cfg).eval(), proc)
    sites = dense.adapter.concrete_sites(dense.model)
    assert "lm.blocks.0.router" in sites and "lm.blocks.0.experts" in sites
    assert "lm.blocks.1.router" not in sites and "lm.blocks.1.experts" not in sites and "lm.blocks.1.mlp" in sites
    assert dense.adapter.routing(dense.model).layers == (0,)
    x = dense.inputs([tiny.image(seed=0)], [dense.prompt("what is this ?")])
    assert trace(dense, x, cache=["lm.blocks.0.router"]).cache["lm.blocks.0.router"].shape[-1] == 4
