"""Classify the mutants that survived the mutmut run of issue 12 (see docs/mutation.md).

Reads mutmut 3's results (``mutants/interp/*.py.meta``: exit code per mutant, 1 = killed, 0 =
survived, 33 = no test ran it, -24 = timed out) and its trampolined sources (each mutant is a
function variant ``x_func__mutmut_N``), rebuilds every surviving mutant's diff against
``x_func__mutmut_orig``, assigns it a class from the table below (by function and mutant number,
judged by reading each diff) and writes one tidy row per surviving mutant.

Usage: python docs/mutation/classify_survivors.py MUTANTS_DIR CURRENT_INTERP_DIR OUT.csv
(``MUTANTS_DIR``: the ``mutants/interp`` folder of the run; ``CURRENT_INTERP_DIR``: today's
``interp/``, to say whether each mutated line still exists.)
"""
from __future__ import annotations

import ast
import difflib
import json
import re
import sys
from pathlib import Path

import pandas as pd

CLASSES = {
    "closed": "real gap: now killed by a test in tests/test_mutants.py (re-checked by hand on current code)",
    "device": "device placement only (.to(device), device=): identical on one CPU device; exercised by "
              "tests/test_dispatch.py's offload runs only where a tensor really moves",
    "dtype": "dtype argument equal to what torch infers (long from ints, bool from comparisons)",
    "equivalent": "equivalent mutant: same result for every input the code can receive",
    "perf": "performance only: logits_to_keep / last_only, KV-cache flags, re-validation, chunk sizes",
    "cosmetic": "progress bar, __repr__, error-message helpers",
    "import-time": "code that runs at import (registration); mutmut 3 forks its test workers after "
                   "importing the module, so no test can see the mutation",
    "unreached": "a branch the five tiny architectures never take (see reason)",
    "default": "a default argument that every caller overrides",
    "open": "real but minor gap left open (refusal boundary or rare layout; see reason)",
}

# (module, function) -> list of (mutant numbers or "*", class, reason)
R: dict[tuple[str, str], list[tuple[object, str, str]]] = {
    ("attention", "query_rows"): [("*", "closed", "text query rows start after the last image token")],
    ("attention", "cell_flow"): [
        ({1, 2}, "default", "query='last' default: callers pass query"),
        ({7}, "equivalent", "prepare's batch is used for the image map and query rows only, which interventions leave alone"),
        ({17, 35, 69}, "closed", "query-weight normalisation, non-square grid, interventions in the forward"),
        ({23}, "equivalent", "sum(+1) == sum(-1) on a 2-D tensor"),
        ({48}, "equivalent", "einsum with upper-case labels is the same contraction"),
        ({49, 50}, "device", ""),
        ({66, 72, 73}, "perf", "last_only: only the last position's logits are computed"),
    ],
    ("attention", "Knockout.edits"): [
        ({23, 27}, "device", ""),
        ({44, 48}, "equivalent", "prefill masks are square (Lq == Lk): shape[2] == shape[-2] == shape[-1]"),
    ],
    ("attention", "Knockout.decode_edits"): [
        ({12, 14, 15, 16, 18, 20, 21}, "unreached", "the mask-is-None branch: decode steps of the tiny models always carry a mask tensor"),
        ({13, 19, 26, 29, 39, 43}, "device", ""),
        ({48, 49}, "closed", "an image token at key 0 (prompt starting with the image) blocked on decode steps"),
    ],
    ("batch", "Batch.__repr__"): [("*", "cosmetic", "__repr__ (no test calls it: exit code 33)")],
    ("batch", "Batch.tensors"): [("*", "unreached", "Batch.tensors() has no caller in the tests (exit code 33)")],
    ("batch", "Batch.replace"): [
        ({3}, "equivalent", "replace() callers change position ids only; image_row None would only break row selection after a replace, which no runner does"),
        ({4}, "perf", "owner None: the batch is re-validated once more (same result)"),
    ],
    ("batch", "Batch.need_one_image_per_row"): [("*", "closed", "refusal of two images per row")],
    ("batch", "validate"): [
        ({2, 3}, "perf", "owner check inverted: a batch made for this model is re-validated (same result); no runner passes another model's Batch"),
        ({10, 19, 20, 22, 43}, "closed", "2-D input_ids check, missing attention mask filled, image tokens without pixels refused"),
        ({21}, "closed", "attention mask key misspelt (same as 20)"),
        ({38, 39}, "equivalent", "any(+1) == any(-1) on a 2-D mask; any(None) reduces to the same all()"),
        ({61, 63}, "dtype", "empty image_row of a text-only batch"),
        ({69, 74}, "perf", "owner id lost: the batch is re-validated on every use (same result)"),
    ],
    ("batch", "_left_padded"): [
        ({6, 30, 33}, "equivalent", "sum/all over +1 == -1 on a 2-D mask"),
        ({13, 15, 22, 24}, "device", ""),
        ({29, 32, 35, 36, 37, 38, 46, 47}, "closed", "mixed padding, holes refused naming the row, position ids rolled"),
        ({52, 54}, "equivalent", "a flattened roll moves the same real-token ids; only padding slots (masked out) differ"),
    ],
    ("batch", "select_rows"): [
        ({8}, "closed", "row index == B refused in one line (was torch's IndexError later)"),
        ({17, 20}, "dtype", "as_tensor of Python ints is already long"),
        ({18, 21, 43, 69, 71}, "device", ""),
        ({26}, "closed", "`continue` → `break` dropped Gemma3's token_type_ids (after pixel_values in its processor's dict)"),
        ({27}, "equivalent", "`and` → `or`: every other per-row input is (B, L), where v[..., idx, :] == v[idx]"),
        ({28, 29, 30, 31}, "closed", "(3, B, L) position ids selected per row"),
        ({32, 33}, "equivalent", "operator precedence: every tensor input is per row, so the branch is the same"),
        ({82, 83, 84, 85, 86}, "unreached", "selected rows without any image (text-only patching is refused earlier)"),
        ({90}, "perf", "owner None: re-validated later (same result)"),
    ],
    ("batch", "concat"): [
        ({14}, "unreached", "no processor output has a non-tensor value"),
        ({16, 17, 18, 19, 20, 21, 22, 23, 24}, "closed", "(3, B, L) position ids joined on the row axis"),
        ({29}, "equivalent", "torch.cat's default dim is 0"),
    ],
    ("dispatch", "then"): [("*", "closed", "an intervention edit and a user edit at one site compose")],
    ("dispatch", "_pattern_attention"): [
        ({6}, "equivalent", "every tiny architecture's attention module has eager_attention_forward"),
        ({48}, "equivalent", "weights and values share the dtype in every run (fp32, and bf16/fp16 runs cast both)"),
        ({51}, "equivalent", "the returned weights are dropped unless output_attentions, which no runner asks for"),
    ],
    ("dispatch", "_register_pattern_kernel"): [("*", "import-time", "AttentionInterface registration at import")],
    ("dispatch", "_Run.__init__"): [
        ({23, 24, 25}, "closed", "positions='image' on a site without token axis refused"),
        ({31}, "equivalent", "step_edits is always reset by begin_forward before any hook runs"),
    ],
    ("dispatch", "_Run._matching"): [
        ({16}, "closed", "Gemma3 rotary call labels select their own call"),
        ({19}, "equivalent", "Gemma3's rotary gets its layer type positionally in transformers 5.24: kwargs unread"),
        ({23, 24}, "equivalent", "split(None) / split('XX#XX') leave the rotary site name (no '#', no space) unchanged"),
    ],
    ("dispatch", "_Run._visit"): [
        ({8}, "closed", "an edit returning another shape is refused"),
        ({13, 14, 18, 19}, "equivalent", "the fired counter is only tested for truth (any non-zero count)"),
    ],
    ("dispatch", "_Run._detach"): [({4, 5}, "device", "to_cpu on a CPU tensor is the identity")],
    ("dispatch", "_Run._image_tokens"): [
        ({3}, "device", ""),
        ({9}, "closed", "per-head values at image positions"),
    ],
    ("dispatch", "_Run.install"): [
        ({9, 11, 12, 39, 42, 48}, "equivalent", "prepend: hook order matters only beside other hooks on the module, and ours are the only ones (accelerate's run as module wrappers)"),
        ({29, 45, 53}, "equivalent", "the hook factories' second argument is unused"),
    ],
    ("dispatch", "_Run._output_hook"): [({5}, "equivalent", "Gemma3's rotary gets its layer type positionally in transformers 5.24: kwargs unread")],
    ("dispatch", "_Run._input_hook"): [
        ({4}, "equivalent", "no call label is read from positional arguments at input sites"),
        ({5}, "equivalent", "no call label is read from keyword arguments at input sites"),
        ({28, 29, 30, 31, 32, 33, 34, 35, 36, 62}, "unreached", "a block input passed by keyword only: every tiny architecture passes it positionally"),
    ],
    ("dispatch", "_Run._pattern_hook"): [({4, 5}, "equivalent", "pattern sites have no call label")],
    ("dispatch", "_Run.end_forward"): [({2, 5}, "closed", "edits that never ran / caches that did not run refused")],
    ("dispatch", "_Unregister.remove"): [({3}, "equivalent", "every key is registered before it is removed")],
    ("dispatch", "_shape"): [("*", "cosmetic", "error-message helper (exit code 33)")],
    ("dispatch", "_call_names"): [("*", "cosmetic", "error-message helper (names the calls in the refusal)")],
    ("dispatch", "forward"): [
        ({1}, "default", "to_cpu default; on CPU the same anyway"),
        ({2}, "default", "grad default True keeps the graph: same values"),
        ({13, 14, 15}, "equivalent", "no generate test passes its own position_ids; the adapter's are the same ids"),
        ({33, 40, 43}, "equivalent", "`later` only names the sites decode steps edit, the same at every step"),
        ({51}, "device", ""),
        ({62}, "equivalent", "decode edits of the shipped interventions use the prefill's sites"),
        ({82, 83, 84, 86, 88, 89, 90}, "perf", "logits_to_keep / use_cache of a single forward"),
        ({115, 119}, "unreached", "Trace.batch of a generation is not read by any runner"),
    ],
    ("dispatch", "_generate"): [
        ({13, 16, 17, 19, 80, 83, 84}, "perf", "use_cache / logits_to_keep: the DynamicCache passed in is updated in place, logits of the last position are the same"),
        ({26, 89}, "equivalent", "argmax(+1) == argmax(-1) on (B, V)"),
        ({46}, "equivalent", "an over-long decode mask: transformers 5.24 reads its first kv_length columns (masking_utils), which are right"),
        ({70}, "open", "refusal of decode edits at new sites: no shipped intervention can trigger it"),
    ],
    ("imagemap", "ImageTokenMap.cells"): [
        ({1, 2}, "default", "cells(n, m) default grid: callers pass the grid"),
        ({5, 8}, "open", "clamp(min=2) differs only for images one patch row or column high"),
        ({54}, "equivalent", "the non-patch marker (-1 vs -2) is never a cell id"),
    ],
    ("imagemap", "ImageTokenMap.raster_order"): [
        ({11}, "equivalent", "a larger radix keeps the lexicographic order"),
        ({13}, "equivalent", "the sort keys are unique, so stability does not matter"),
    ],
    ("imagemap", "ImageTokenMap.to"): [("*", "device", "")],
    ("imagemap", "image_fields"): [
        ({21, 26, 27}, "equivalent", "row/col of newline tokens are never read (is_patch excludes them)"),
        ("*", "unreached", "trailing tokens / an image with no views: no tiny architecture has them"),
    ],
    ("imagemap", "build"): [
        ({5, 8}, "dtype", "torch.full with an int fill is long"),
        ({32, 33, 35}, "open", "more image tokens than fields: the refusal is not reached by consistent processor output"),
        ({45}, "closed", "the third image of a row"),
        ({53, 60, 62}, "device", ""),
        ({69}, "equivalent", "batch_row None: select_rows rebuilds it and no LM-site reader uses it"),
        ({78}, "open", "view index (multi-view images: LLaVA-NeXT base + crops order the same way in the tiny model)"),
        ({81}, "closed", "non-square grids: rows and cols kept apart"),
    ],
    ("imagemap", "from_fields"): [
        ({67}, "closed", "non-square grids: rows and cols kept apart"),
        ({26}, "equivalent", "torch.cat's default dim is 0"),
        ("*", "unreached", "the empty map of a batch without images at a vision site (refused before)"),
    ],
    ("interventions", "bapa_position_ids"): [
        ({1}, "closed", "the (B, L) shape refusal with `or` → `and`"),
        ({6}, "equivalent", "both branches are image_mask.long()"),
        ({24}, "equivalent", "a text token after an image already counts a step (labels == 0)"),
        ({35}, "equivalent", "cumsum(+1) == cumsum(-1) on (B, L)"),
    ],
    ("interventions", "agci_inject"): [
        ({17, 18, 19, 46}, "closed", "the per-image formula and the tokens_per_image refusals"),
        ({33, 41, 70, 77}, "equivalent", "split/cat/stack default dim is 0"),
        ({56, 58, 65}, "equivalent", "cosine_similarity's default dim 1 / unsqueeze(+1) on 1-D == the last dim"),
    ],
    ("interventions", "_image_groups"): [({7}, "equivalent", "an extra empty group is skipped (sel.any())")],
    ("interventions", "BaPA.position_ids"): [({31}, "equivalent", "M-RoPE reads the first three planes; the ids repeated in all planes are equal")],
    ("interventions", "adaptive_lambda"): [
        ({1, 2}, "default", "scale / lam_max defaults: AdaptiveAGCI passes both"),
        ({20, 22, 30}, "equivalent", "default or +1 dim == the last dim on (N, D)"),
    ],
    ("interventions", "AdaptiveAGCI.__post_init__"): [("*", "equivalent", "any non-empty tensor validates the rule name")],
    ("interventions", "AdaptiveAGCI.strength"): [("*", "closed", "scale and lam_max passed on")],
    ("interventions", "AdaptiveAGCI.lambdas"): [("*", "closed", "pooled passed on")],
    ("interventions", "register"): [("*", "import-time", "the KINDS registry is filled at import")],
    ("interventions", "from_dict"): [({6}, "closed", "a dict without 'kind' refused in one line (was KeyError)")],
    ("interventions", "PositionPermute.position_ids"): [
        ({3, 15, 17}, "closed", "the shuffle is fixed by its seed"),
        ({13}, "device", ""),
    ],
    ("patching", "logit_diff"): [
        ({3, 5}, "device", ""),
        ({24}, "equivalent", "float('-INF') == float('-inf')"),
        ({25}, "equivalent", "max(+1) == max(-1) on (B, n)"),
    ],
    ("patching", "group_masks"): [("*", "closed", "the text group: real tokens after the last image token")],
    ("patching", "_check_site"): [("*", "closed", "rotary / unembed / no-token-axis sites refused")],
    ("patching", "site_groups"): [
        ({16}, "open", "rows with different token counts at a vision site (needs mixed image sizes in one call)"),
        ({19, 20, 21, 22, 23, 24, 25, 26}, "unreached", "a batch with no rows"),
        ({37, 64, 65}, "closed", "the grid reaches the LM groups; vision sites have an 'image' group"),
        ({51, 54}, "dtype", "as_tensor of ints is long like the cells"),
        ({52, 55}, "device", ""),
    ],
    ("patching", "_selection"): [("*", "closed", "single-position patches")],
    ("patching", "run_patches"): [
        ({1, 2}, "default", "batch_size / progress defaults: callers pass them"),
        ({7, 14, 26, 27, 28, 29, 30, 31}, "closed", "mismatched inputs and the target group's one-image rule refused"),
        ({37, 38, 39, 85, 88, 89, 90, 91, 92, 93, 95, 96, 97, 98, 99}, "perf", "chunk packing: which rows share a forward, not their results (99: endless loop, timed out)"),
        ({68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 226}, "cosmetic", "tqdm progress bar"),
        ({114, 135}, "closed", "interventions and the grid reach the patched forwards"),
        ({180, 184, 185}, "perf", "last_only"),
        ({189}, "device", ""),
        ({210, 211}, "closed", "the position column"),
    ],
    ("patching", "_copy"): [
        ({1}, "unreached", "the clone for a recorded graph: patching runs under no_grad"),
        ({11, 12}, "device", ""),
    ],
    ("patching", "restoration"): [
        ({61, 63, 68}, "equivalent", "the n_items groupby's order: pandas aligns the column on the index"),
        ({3}, "equivalent", "groupby(sort=None) does not sort, like sort=False"),
        ("*", "closed", "restoration table: columns, first-seen order, counts"),
    ],
    ("patching", "default_patches"): [("*", "closed", "every site and group listed")],
    ("sites", "resolve"): [
        ({4}, "equivalent", "'XXXX' is not a site either: the same one-line refusal"),
        ({54}, "equivalent", "heads '' and None are both false"),
        ({73, 75, 104, 106, 141, 143}, "equivalent", "Adapter.path does not use the model for these sites"),
        ("*", "closed", "call index, key, heads, canonical name and token axis of every site form"),
    ],
    ("sites", "every_site"): [("*", "closed", "per-head and pattern sites listed for every LM layer")],
    ("sites", "_with_key"): [("*", "closed", "#input / #kwarg sites keep their call and canonical name")],
    ("sites", "_layer_index"): [("*", "closed", "negative and positive layer bounds")],
}


def mutants(mut_dir: Path):
    for meta in sorted(mut_dir.glob("*.py.meta")):
        mod = meta.name[:-len(".py.meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        src = (mut_dir / f"{mod}.py").read_text()
        lines = src.splitlines()
        funcs = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(src))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in n.name}
        for key, code in codes.items():
            fname = key.split(".")[-1]
            base, num = fname.rsplit("__mutmut_", 1)
            orig = funcs[base + "__mutmut_orig"].replace(base + "__mutmut_orig", "F", 1).splitlines()
            mut = funcs[fname].replace(fname, "F", 1).splitlines()
            diff = [d for d in difflib.unified_diff(orig, mut, lineterm="", n=0) if not d.startswith(("---", "+++", "@@"))]
            func = base[2:] if base.startswith("x_") else base[1:].strip("ǁ").replace("ǁ", ".")
            yield {"module": mod, "function": func, "mutant": int(num), "name": key, "exit_code": code,
                   "before": " ".join(d[1:].strip() for d in diff if d.startswith("-")),
                   "after": " ".join(d[1:].strip() for d in diff if d.startswith("+"))}


def classify(row) -> tuple[str, str]:
    for nums, cls, why in R.get((row["module"], row["function"]), []):
        if nums == "*" or row["mutant"] in nums:
            return cls, why
    raise KeyError(f"unclassified survivor {row['name']}")


def main(mut_dir: str, interp_dir: str, out: str) -> pd.DataFrame:
    rows = list(mutants(Path(mut_dir)))
    now = re.sub(r"\s+", " ", "\n".join(p.read_text() for p in Path(interp_dir).rglob("*.py")))
    df = pd.DataFrame(rows)
    surv = df[df.exit_code != 1].copy()
    surv[["class", "reason"]] = surv.apply(lambda r: pd.Series(classify(r)), axis=1)
    surv["line_in_current_main"] = surv.before.map(lambda b: bool(b) and re.sub(r"\s+", " ", b) in now)
    surv.to_csv(out, index=False)
    totals = df.assign(result=df.exit_code.map({1: "killed", 0: "survived", 33: "not run (33)"}).fillna("timeout"))
    print(totals.pivot_table(index="module", columns="result", values="name", aggfunc="count", fill_value=0,
                             margins=True, margins_name="all").to_string())
    print()
    print(surv.pivot_table(index="module", columns="class", values="name", aggfunc="count", fill_value=0,
                           margins=True, margins_name="all").to_string())
    return surv


if __name__ == "__main__":
    main(*sys.argv[1:4])
