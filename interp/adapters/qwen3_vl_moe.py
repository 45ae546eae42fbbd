"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration, e.g. Qwen3-VL-30B-A3B): Qwen3-VL's vision
side, DeepStack, processor, interleaved M-RoPE and module paths exactly (:mod:`interp.adapters.qwen3_vl`),
with a mixture-of-experts MLP in the LM blocks.

MoE block (``model.language_model.layers.{i}.mlp``, HF's ``Qwen3VLMoeTextSparseMoeBlock``, on every
block i not in ``mlp_only_layers`` with (i + 1) % ``decoder_sparse_step`` == 0; the others keep a
dense MLP of ``intermediate_size``): the block flattens its input x (B, L, D) to (B·L, D) and

* ``mlp.gate`` (``Qwen3VLMoeTextTopKRouter``; site ``lm.blocks.{i}.router``) returns the tuple
  (router logits (B·L, E) = x Wᵀ, W (E, D); routing weights (B·L, k): the top-k of softmax(logits)
  in fp32, renormalised to sum 1, cast to the logits' dtype; expert indices (B·L, k), long).
  The site is the logits (the tuple's first element, as HF's ``output_router_logits=True``
  records them: ``outputs.router_logits[j]`` is the j-th MoE block's (B·L, E)). The block itself
  uses only the weights and indices, so a write to the logits would do nothing by itself: the
  adapter recomputes both from the written logits with the router's own rule
  (:meth:`Qwen3VLMoeAdapter.complete_output`), so writing the site re-routes the tokens (and a
  write that changes nothing leaves the output bit-identical).
* ``mlp.experts`` (``Qwen3VLMoeTextExperts``: E experts' SwiGLU weights stacked, gate_up (E, 2 Fe, D),
  down (E, D, Fe), Fe = ``moe_intermediate_size``; site ``lm.blocks.{i}.experts``) is called with
  (x (B·L, D), indices, weights) and returns Σ_k weight_k · expert_{index_k}(x), (B·L, D); the block
  reshapes it to (B, L, D) (``lm.blocks.{i}.mlp``). No shared expert.

E = ``num_experts`` (saved in config.json as ``num_local_experts``), k = ``num_experts_per_tok``.
Router and expert sites hold tokens flattened batch row by batch row ((B·L, …): row b·L + l is
token l of row b), the LM token order every LM site has once flattened, so ``positions="image"``
caches and cell patches read them as any LM site.

Memory: a token goes through k experts of width Fe, so the MLP widths the memory model counts per
token are those of k·Fe (a dense layer of ``mlp_only_layers``: ``intermediate_size``); the
parameters count all E experts of every MoE block and the routers (E·D each). HF's default experts implementation
(``grouped_mm``) copies each token's input once per chosen expert and sorts the copies by expert,
so at its peak a MoE block holds, per token, k·(D + 3 Fe) (copies, gate·up, activation) or 4 k·D
(copies, down projection, weighted and re-ordered outputs), the larger (read from the code of
``transformers.integrations.moe.grouped_mm_experts_forward``, not measured).
"""
from __future__ import annotations

import re
from dataclasses import fields, replace
from typing import Any

import torch

from interp.adapters.base import text_keys
from interp.adapters.moe import Routing
from interp.adapters.qwen3_vl import QWEN3_VL, Qwen3VLAdapter

ROUTER, EXPERTS = "lm.blocks.{i}.router", "lm.blocks.{i}.experts"


def moe_layers(t: dict[str, Any]) -> tuple[int, ...]:
    """LM blocks with a MoE MLP, from a text config mapping (HF's rule: not in ``mlp_only_layers``,
    experts > 0 and (i + 1) % ``decoder_sparse_step`` == 0)."""
    n_exp = int(t.get("num_experts") or t.get("num_local_experts") or 0)
    step = int(t.get("decoder_sparse_step") or 1)
    dense = set(t.get("mlp_only_layers") or ())
    return tuple(i for i in range(int(t["num_hidden_layers"])) if n_exp > 0 and i not in dense and (i + 1) % step == 0)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    def routing(self, model):
        """Every MoE block's router: E experts, top k per token."""
        tc = model.config.text_config
        return Routing(layers=moe_layers(tc.to_dict()), experts=int(tc.num_experts), top_k=int(tc.num_experts_per_tok))

    def concrete_sites(self, model):
        """The router and experts sites exist on MoE blocks only (a dense block of
        ``mlp_only_layers`` has neither)."""
        moe = set(self.routing(model).layers)
        keep = {p.format(i=i) for p in (ROUTER, EXPERTS) for i in moe}
        drop = {p.format(i=i) for p in (ROUTER, EXPERTS) for i in range(self.layer_count(model, "lm"))} - keep
        return [s for s in super().concrete_sites(model) if s not in drop]

    def complete_output(self, model, path, out):
        """A router's (logits, weights, indices) after a write to the logits (B·L, E): weights and
        indices recomputed from them as ``Qwen3VLMoeTextTopKRouter.forward`` does (top-k of the
        fp32 softmax, renormalised, cast to the logits' dtype)."""
        if not _ROUTER_PATH.match(path):
            return out
        logits = out[0]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        top, idx = torch.topk(probs, int(model.config.text_config.num_experts_per_tok), dim=-1)
        top = (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype)
        return (logits, top, idx) + tuple(out[3:])

    def memory_profile(self, cfg, image_px=(336, 336)):
        """Qwen3-VL's facts (patch layout, q/k norms) with the MoE MLP's (see the module doc): per
        token max(k(D + 3Fe), 4kD) live at the peak; autograd keeps 3k·Fe (SiLU input, gate·up
        factors of k experts) + k·D (expert outputs, multiplied by their weights) + the router's
        fp32 probabilities and int64 indices (≈ 4E + 64k bytes, counted as 2E elements; within 2 %
        of saved-tensor hooks at fp32 and bf16, tests/test_bench_scale.py); parameters E·(3 D·Fe + D)
        per MoE block and 3 D·F per dense block (dense blocks' 3 F where larger)."""
        t = text_keys(cfg.get("text_config", cfg))
        D, F, n = int(t["hidden_size"]), int(t["intermediate_size"]), int(t["num_hidden_layers"])
        E = int(t.get("num_experts") or t.get("num_local_experts") or 0)
        k, Fe = int(t.get("num_experts_per_tok") or 0), int(t.get("moe_intermediate_size") or 0)
        n_moe = len(moe_layers(t))
        dense = n - n_moe
        return replace(super().memory_profile(cfg, image_px),
                       lm_mlp_live=max(k * (D + 3 * Fe), 4 * k * D, 3 * F if dense else 0),
                       lm_mlp_saved=max(3 * k * Fe + k * D + 2 * E, 3 * F if dense else 0),
                       lm_mlp_params=n_moe * E * (3 * D * Fe + D) + dense * 3 * D * F)


QWEN3_VL_MOE = Qwen3VLMoeAdapter(
    **{**{f.name: getattr(QWEN3_VL, f.name) for f in fields(QWEN3_VL)},
       "name": "qwen3vlmoe", "model_classes": ("Qwen3VLMoeForConditionalGeneration",),
       "model_types": ("qwen3_vl_moe",),
       "sites": {**QWEN3_VL.sites, ROUTER: "model.language_model.layers.{i}.mlp.gate",
                 EXPERTS: "model.language_model.layers.{i}.mlp.experts"},
       "shapes": {**QWEN3_VL.shapes,
                  "lm.blocks.{i}.mlp": "(B, L, D) the MoE block's output (Σ over the token's top-k experts of "
                                       "weight × expert output) before the residual add",
                  ROUTER: "(B·L, E) router logits of every token (row b·L + l: token l of row b); a write "
                          "re-routes: the top-k weights and indices are recomputed from it",
                  EXPERTS: "(B·L, D) the weighted sum of each token's top-k experts' outputs (lm.blocks.{i}.mlp "
                           "flattened)"}})
"""Qwen3-VL-MoE: Qwen3-VL's fields, its name, class and model type, plus the MoE sites."""

_ROUTER_PATH = re.compile("^" + re.escape(QWEN3_VL_MOE.sites[ROUTER]).replace(r"\{i\}", r"-?\d+") + "$")
