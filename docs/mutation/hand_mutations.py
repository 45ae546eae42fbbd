"""Re-check, on the current code, that tests/test_mutants.py kills the mutants it names.

For each entry (mutmut's name of the mutant at fe4f911, file, original text, mutated text, pytest -k
expression) the mutation is applied to the file by hand, the selected tests run in a forked child
(torch and transformers are imported once, interp fresh in each child), the test must fail
(pytest exit code 1), and the file is restored. Run from anywhere:
    python docs/mutation/hand_mutations.py [substring ...]   # all entries, or those whose name matches
Prints one line per mutant: KILLED or SURVIVED(rc=…); BAD-PATTERN when the text is not found once.
Do not edit interp/ or tests/ while it runs.
"""
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
M = [
 # id (mutmut name at fe4f911), file, old, new, -k expression
 ("batch._left_padded_46", "interp/batch.py", 'k == "position_ids":\n            rolled', 'k == "XXposition_idsXX":\n            rolled', "rolls_every_plane"),
 ("batch._left_padded_29", "interp/batch.py", "bad = ~(left_ok.all(-1) |", "bad = ~(left_ok.all(None) |", "rolls_every_plane"),
 ("batch._left_padded_32", "interp/batch.py", "| right_ok.all(-1))", "| right_ok.all(None))", "rolls_every_plane"),
 ("batch._left_padded_35", "interp/batch.py", "if bool(bad.any()):", "if bool(None):", "padding_holes"),
 ("batch._left_padded_38", "interp/batch.py", "r = int(bad.nonzero()[0])", "r = int(bad.nonzero()[1])", "padding_holes"),
 ("batch.validate_10", "interp/batch.py", "if not isinstance(ids, torch.Tensor) or ids.dim() != 2:", "if not isinstance(ids, torch.Tensor) and ids.dim() != 2:", "validate_fills"),
 ("batch.validate_19", "interp/batch.py", 't["attention_mask"] = mask = torch.ones_like(ids)', 't["attention_mask"] = mask = None', "validate_fills"),
 ("batch.validate_20", "interp/batch.py", 't["attention_mask"] = mask = torch.ones_like(ids)', 't["XXattention_maskXX"] = mask = torch.ones_like(ids)', "validate_fills"),
 ("batch.validate_43", "interp/batch.py", "if not has_pixels and bool(img.any()):", "if not has_pixels and bool(None):", "validate_fills"),
 ("batch.need_one_image_per_row_1", "interp/batch.py", "bad = [r for r, n in enumerate(self.images_per_row) if n != 1]", "bad = None", "validate_fills"),
 ("batch.select_rows_28", "interp/batch.py", 'if k == "position_ids" and isinstance(v, torch.Tensor):', 'if k != "position_ids" and isinstance(v, torch.Tensor):', "select_rows_and_concat"),
 ("batch.select_rows_29", "interp/batch.py", 'if k == "position_ids" and isinstance(v, torch.Tensor):', 'if k == "XXposition_idsXX" and isinstance(v, torch.Tensor):', "select_rows_and_concat"),
 ("batch.select_rows_31", "interp/batch.py", "out[k] = v[..., idx, :]", "out[k] = None", "select_rows_and_concat"),
 ("batch.concat_16", "interp/batch.py", 'elif k == "position_ids":', 'elif k == "XXposition_idsXX":', "select_rows_and_concat"),
 ("batch.concat_23", "interp/batch.py", "t[k] = torch.cat([x, y], -2)", "t[k] = torch.cat([x, y], +2)", "select_rows_and_concat"),
 ("batch.concat_24", "interp/batch.py", "t[k] = torch.cat([x, y], -2)", "t[k] = torch.cat([x, y], -3)", "select_rows_and_concat"),
 ("imagemap.build_45", "interp/imagemap.py", "img += 1", "img = 1", "three_images"),
 ("imagemap.build_81", "interp/imagemap.py", "rows=out[4], cols=out[5]", "rows=out[5], cols=out[5]", "non_square"),
 ("imagemap.from_fields_67", "interp/imagemap.py", "rows=f[:, 3], cols=f[:, 4]", "rows=f[:, 4], cols=f[:, 4]", "non_square"),
 ("dispatch.then_3", "interp/dispatch.py", "prev = out.get(site)", "prev = None", "then_runs"),
 ("dispatch.then_7", "interp/dispatch.py", "f=fn, g=prev: f(g(x)))", "f=fn, g=prev: None)", "then_runs"),
 ("dispatch.then_9", "interp/dispatch.py", "f=fn, g=prev: f(g(x)))", "f=fn, g=prev: f(g(None)))", "then_runs"),
 ("dispatch._Run._visit_8", "interp/dispatch.py", "(not isinstance(new, torch.Tensor) or new.shape != value.shape)", "(not isinstance(new, torch.Tensor) and new.shape != value.shape)", "change_shape_or_never"),
 ("dispatch._Run.end_forward_2", "interp/dispatch.py", "if name in self.sites and not self.fired.get(name):", "if name not in self.sites and not self.fired.get(name):", "change_shape_or_never"),
 ("dispatch._Run.end_forward_5", "interp/dispatch.py", "if len(self.values[name]) <= self._forward_index:\n                raise SpatialBiasError(f\"{name} did not", "if len(self.values[name]) < self._forward_index:\n                raise SpatialBiasError(f\"{name} did not", "change_shape_or_never"),
 ("dispatch._Run.__init___23", "interp/dispatch.py", '        if positions == "image":\n            bad', '        if positions == "XXimageXX":\n            bad', "change_shape_or_never"),
 ("dispatch._Run.__init___25", "interp/dispatch.py", "bad = [n for n in self.cache if self.sites[n].tokens is None]", "bad = None", "change_shape_or_never"),
 ("dispatch._Run._image_tokens_9", "interp/dispatch.py", "width = 2 if site.heads else 1", "width = 3 if site.heads else 1", "per_head_site"),
 ("dispatch._Run._matching_16", "interp/dispatch.py", "isinstance(s.call, str) and s.call == self.lvlm", "isinstance(s.call, str) and s.call != self.lvlm", "rotary_call_labels"),
 ("patching.group_masks_21", "interp/patching/core.py", "after[b, int(img[-1]) + 1:] = True", "after[b, int(img[-1]) - 1:] = True", "text_group"),
 ("patching.group_masks_23", "interp/patching/core.py", "after[b, int(img[-1]) + 1:] = True", "after[b, int(img[+1]) + 1:] = True", "text_group"),
 ("patching.group_masks_25", "interp/patching/core.py", "after[b, int(img[-1]) + 1:] = True", "after[b, int(img[-1]) + 2:] = True", "text_group"),
 ("patching.group_masks_26", "interp/patching/core.py", "after[b, int(img[-1]) + 1:] = True", "after[b, int(img[-1]) + 1:] = False", "text_group"),
 ("patching.group_masks_39", "interp/patching/core.py", '"text": after & mask', '"text": after | mask', "text_group"),
 ("patching._check_site_9", "interp/patching/core.py", 'if s.canonical == "lm.rotary":', 'if s.canonical == "XXlm.rotaryXX":', "without_tokens"),
 ("patching._check_site_11", "interp/patching/core.py", 'if s.tokens is None or s.canonical == "unembed":', 'if s.tokens is None and s.canonical == "unembed":', "without_tokens"),
 ("patching._check_site_14", "interp/patching/core.py", 'if s.tokens is None or s.canonical == "unembed":', 'if s.tokens is None or s.canonical == "XXunembedXX":', "without_tokens"),
 ("patching._selection_2", "interp/patching/core.py", "if not 0 <= patch.position < idx.shape[1]:", "if 0 <= patch.position < idx.shape[1]:", "single_position"),
 ("patching._selection_3", "interp/patching/core.py", "if not 0 <= patch.position < idx.shape[1]:", "if not 1 <= patch.position < idx.shape[1]:", "single_position"),
 ("patching._selection_5", "interp/patching/core.py", "if not 0 <= patch.position < idx.shape[1]:", "if not 0 <= patch.position <= idx.shape[1]:", "single_position"),
 ("patching._selection_6", "interp/patching/core.py", "if not 0 <= patch.position < idx.shape[1]:", "if not 0 <= patch.position < idx.shape[2]:", "single_position"),
 ("patching._selection_7", "interp/patching/core.py", "return idx[row, patch.position:patch.position + 1]", "return idx[row, patch.position:patch.position - 1]", "single_position"),
 ("patching._selection_8", "interp/patching/core.py", "return idx[row, patch.position:patch.position + 1]", "return idx[row, patch.position:patch.position + 2]", "single_position"),
 ("patching.run_patches_210", "interp/patching/core.py", '"group": p.group, "position": p.position', '"group": p.group, "XXpositionXX": p.position', "single_position"),
 ("patching.run_patches_114", "interp/patching/full.py", "chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)\n        row_targets", "chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), )\n        row_targets", "runs_under_the_interventions"),
 ("patching._resumed_patches (new code, same mutation)", "interp/patching/resumed.py", "chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)\n        with torch.no_grad", "chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), )\n        with torch.no_grad", "runs_under_the_interventions"),
 ("patching._pre_jobs (new code, same mutation)", "interp/patching/resumed.py", "sub, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)", "sub, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), )", "runs_under_the_interventions"),
 ("patching.run_patches_135", "interp/patching/full.py", "groups = {site: site_groups(lvlm, chunk, site, row_targets, grid) for site in sites}", "groups = {site: site_groups(lvlm, chunk, site, row_targets, ) for site in sites}", "grid_reaches"),
 ("patching.site_groups_37", "interp/patching/core.py", "return idx, group_masks(lvlm, batch, targets, grid=grid)", "return idx, group_masks(lvlm, batch, targets, )", "grid_reaches"),
 ("patching.site_groups_64", "interp/patching/core.py", '{"all": every, "image": every.clone()', '{"all": every, "XXimageXX": every.clone()', "grid_reaches"),
 ("patching.run_patches_7", "interp/patching/activation.py", 'base["input_ids"].shape or source.images_per_row', 'base["input_ids"].shape and source.images_per_row', "refuses_mismatched"),
 ("patching.run_patches_14", "interp/patching/activation.py", "if len(targets) != N or correct.shape[0] != N:", "if len(targets) != N and correct.shape[0] != N:", "refuses_mismatched"),
 ("patching.run_patches_28", "interp/patching/activation.py", 'p.group == "target" and p.position is None for p in patches', 'p.group == "target" and p.position is not None for p in patches', "refuses_mismatched"),
 ("patching.run_patches_29", "interp/patching/activation.py", "base.need_one_image_per_row(\"the 'target' token group\")", "base.need_one_image_per_row(None)", "refuses_mismatched"),
 ("patching.restoration_10", "interp/patching/core.py", 'g = df.groupby(["site", "group"], sort=False)[[', 'g = df.groupby(["site", "group"], sort=True)[[', "restoration_table"),
 ("patching.restoration_5", "interp/patching/core.py", 'g = df.groupby(["site", "group"], sort=False)', 'g = df.groupby(["site", "group"], )', "restoration_table"),
 ("patching.restoration_49", "interp/patching/core.py", '"patched": g["metric"]', '"XXpatchedXX": g["metric"]', "restoration_table"),
 ("patching.restoration_53", "interp/patching/core.py", '"clean": clean, "corrupt"', '"XXcleanXX": clean, "corrupt"', "restoration_table"),
 ("patching.restoration_55", "interp/patching/core.py", '"corrupt": corrupt})', '"XXcorruptXX": corrupt})', "restoration_table"),
 ("patching.restoration_57", "interp/patching/core.py", 'res["n_items"] = df.groupby(["site", "group"], sort=False)["item"].nunique()', 'res["n_items"] = None', "restoration_table"),
 ("patching.restoration_72", "interp/patching/core.py", 'res["direction"] = direction', 'res["XXdirectionXX"] = direction', "restoration_table"),
 ("patching.default_patches_15", "interp/patching/core.py", 'out += [Patch("lm.input", g) for g in groups]', 'out = [Patch("lm.input", g) for g in groups]', "default_patches"),
 ("patching.default_patches_20", "interp/patching/core.py", 'out += [Patch("lm.input", g) for g in groups]', 'out += [Patch("lm.input", ) for g in groups]', "default_patches"),
 ("patching.default_patches_23", "interp/patching/core.py", 'out += [Patch(f"lm.blocks.{i}", g)', 'out = [Patch(f"lm.blocks.{i}", g)', "default_patches"),
 ("patching.default_patches_28", "interp/patching/core.py", 'out += [Patch(f"lm.blocks.{i}", g)', 'out += [Patch(f"lm.blocks.{i}", )', "default_patches"),
 ("attention.query_rows_24", "interp/interventions/knockout.py", "q[b, int(pos[-1]) + 1:] = True", "q[b, int(pos[-1]) - 1:] = True", "cell_flow_text"),
 ("attention.query_rows_26", "interp/interventions/knockout.py", "q[b, int(pos[-1]) + 1:] = True", "q[b, int(pos[+1]) + 1:] = True", "cell_flow_text"),
 ("attention.query_rows_27", "interp/interventions/knockout.py", "q[b, int(pos[-1]) + 1:] = True", "q[b, int(pos[-2]) + 1:] = True", "cell_flow_text"),
 ("attention.cell_flow_17", "interp/attention.py", "w = q / q.sum(-1, keepdim=True)", "w = q * q.sum(-1, keepdim=True)", "cell_flow_text"),
 ("attention.cell_flow_35", "interp/attention.py", "range(grid[0] * grid[1])", "range(grid[1] * grid[1])", "cell_flow_text"),
 ("attention.cell_flow_69", "interp/attention.py", "t = forward(lvlm, inputs, interventions, cache=sites", "t = forward(lvlm, inputs, cache=sites", "cell_flow_text"),
 ("interventions.agci_inject_46", "interp/interventions/agci.py", "g = g_all if pooled else v.mean(0)", "g = g_all if pooled else v.mean(None)", "agci_inject_is"),
 ("interventions.agci_inject_17", "interp/interventions/agci.py", "if tokens_per_image <= 0 or T % tokens_per_image:", "if tokens_per_image <= 0 and T % tokens_per_image:", "agci_inject_is"),
 ("interventions.agci_inject_18", "interp/interventions/agci.py", "if tokens_per_image <= 0 or T % tokens_per_image:", "if tokens_per_image < 0 or T % tokens_per_image:", "agci_inject_is"),
 ("interventions.agci_inject_19", "interp/interventions/agci.py", "if tokens_per_image <= 0 or T % tokens_per_image:", "if tokens_per_image <= 1 or T % tokens_per_image:", "agci_inject_is"),
 ("interventions.AdaptiveAGCI.strength_7", "interp/interventions/agci.py", "return adaptive_lambda(v, self.rule, self.scale, self.lam_max)", "return adaptive_lambda(v, self.rule, self.lam_max)", "scale_and_cap"),
 ("interventions.AdaptiveAGCI.strength_8", "interp/interventions/agci.py", "return adaptive_lambda(v, self.rule, self.scale, self.lam_max)", "return adaptive_lambda(v, self.rule, self.scale, )", "scale_and_cap"),
 ("interventions.AdaptiveAGCI.lambdas_15", "interp/interventions/agci.py", "_image_groups(t.batch.imap, self.pooled)", "_image_groups(t.batch.imap, None)", "scale_and_cap"),
 ("interventions.PositionPermute.position_ids_3", "interp/interventions/controls.py", "gen = torch.Generator().manual_seed(self.seed)", "gen = None", "fixed_by_its_seed"),
 ("interventions.PositionPermute.position_ids_17", "interp/interventions/controls.py", "torch.randperm(len(idx), generator=gen)", "torch.randperm(len(idx), )", "fixed_by_its_seed"),
 ("batch.select_rows_26", "interp/batch.py", "        if k in image_keys:\n            continue", "        if k in image_keys:\n            break", "after_the_image"),
 ("attention.Knockout.decode_edits_48", "interp/interventions/knockout.py", "inside = (col >= 0) & (col < L)", "inside = (col > 0) & (col < L)", "column_0"),
 ("attention.Knockout.decode_edits_49", "interp/interventions/knockout.py", "inside = (col >= 0) & (col < L)", "inside = (col >= 1) & (col < L)", "column_0"),
 ("batch.select_rows_8", "interp/batch.py", "if any(not 0 <= r < B for r in rows):", "if any(not 0 <= r <= B for r in rows):", "one_line_refusals"),
 ("interventions.bapa_position_ids_1", "interp/interventions/bapa.py", "if input_ids.dim() != 2 or image_mask.shape != input_ids.shape:", "if input_ids.dim() != 2 and image_mask.shape != input_ids.shape:", "one_line_refusals"),
 ("interventions.from_dict_6", "interp/interventions/base.py", 'kind = d.pop("kind", None)', 'kind = d.pop("kind", )', "one_line_refusals"),
 ("sites.resolve_30", "interp/sites.py", 'call=call, canonical=base), key, name)', 'call=call, canonical=base), key, None)', "resolved_sites"),
 ("sites.resolve_69", "interp/sites.py", 'hook="input", call=call,\n                    tokens="lm" if base == "lm.input"', 'hook="input", tokens="lm" if base == "lm.input"', "resolved_sites"),
 ("sites.resolve_135", "interp/sites.py", 'tokens="lm" if heads else None,\n                    canonical=canonical)', 'canonical=canonical)', "resolved_sites"),
 ("interventions.AdaptiveAGCI.lambdas_17", "interp/interventions/agci.py", "_image_groups(t.batch.imap, self.pooled)", "_image_groups(t.batch.imap, )", "scale_and_cap"),
 ("patching.run_patches_211", "interp/patching/core.py", '"group": p.group, "position": p.position', '"group": p.group, "POSITION": p.position', "single_position"),
 ("sites.resolve_29", "interp/sites.py", 'call=call, canonical=base), key, name)', 'call=call, canonical=base), None, name)', "resolved_sites"),
 ("sites.resolve_37", "interp/sites.py", 'hook="output", call=call, canonical=base), key, name)', 'hook="output", call=None, canonical=base), key, name)', "resolved_sites"),
 ("sites.resolve_43", "interp/sites.py", 'hook="output", call=call, canonical=base), key, name)', 'hook="output", call=call, ), key, name)', "resolved_sites"),
 ("sites.resolve_63", "interp/sites.py", 'hook="input", call=call,\n                    tokens=', 'hook="input", call=None,\n                    tokens=', "resolved_sites"),
 ("sites.resolve_126", "interp/sites.py", "hook=hook, call=call, heads=heads, tokens=\"lm\" if heads", "hook=hook, call=None, heads=heads, tokens=\"lm\" if heads", "resolved_sites"),
 ("sites.resolve_127", "interp/sites.py", "call=call, heads=heads, tokens=\"lm\" if heads", "call=call, heads=None, tokens=\"lm\" if heads", "resolved_sites"),
 ("sites.resolve_128", "interp/sites.py", 'heads=heads, tokens="lm" if heads else None,', 'heads=heads, tokens=None,', "resolved_sites"),
 ("sites.resolve_136", "interp/sites.py", '                    canonical=canonical)\n    path = adapter.path(base, model)', '                    )\n    path = adapter.path(base, model)', "resolved_sites"),
 ("sites.resolve_161", "interp/sites.py", 'base.startswith("lm.") and base != "lm.rotary" or base', 'base.startswith("lm.") or base != "lm.rotary" or base', "resolved_sites"),
 ("sites.resolve_166", "interp/sites.py", 'base != "lm.rotary" or base == "unembed"', 'base != "XXlm.rotaryXX" or base == "unembed"', "resolved_sites"),
 ("sites.resolve_168", "interp/sites.py", 'base != "lm.rotary" or base == "unembed"', 'base != "lm.rotary" or base != "unembed"', "resolved_sites"),
 ("sites.resolve_169", "interp/sites.py", 'base != "lm.rotary" or base == "unembed"', 'base != "lm.rotary" or base == "XXunembedXX"', "resolved_sites"),
 ("sites.every_site_9", "interp/sites.py", "m = _LAYER.match(name)\n        if m and", "m = None\n        if m and", "resolved_sites"),
 ("sites.every_site_16", "interp/sites.py", 'm.group("stack") == "lm" and m.group("rest") == ".attn"', 'm.group("stack") != "lm" and m.group("rest") == ".attn"', "resolved_sites"),
 ("sites.every_site_23", "interp/sites.py", 'm.group("rest") == ".attn"', 'm.group("rest") == "XX.attnXX"', "resolved_sites"),
 ("sites._with_key_6", "interp/sites.py", ".get(site.canonical, f\"{site.canonical}#input\")", ".get(None, f\"{site.canonical}#input\")", "resolved_sites"),
 ("sites._with_key_13", "interp/sites.py", 'hook="input", call=site.call, tokens=site.tokens', 'hook="input", call=None, tokens=site.tokens', "resolved_sites"),
 ("sites._with_key_28", "interp/sites.py", 'hook="kwarg", key=key, call=site.call,', 'hook="kwarg", key=key, call=None,', "resolved_sites"),
 ("sites._with_key_35", "interp/sites.py", 'call=site.call, canonical=f"{site.canonical}#{key}")', 'call=site.call, )', "resolved_sites"),
 ("sites._layer_index_19", "interp/sites.py", "if not -n <= i < n:", "if not -n < i < n:", "resolved_sites"),
 ("sites._layer_index_20", "interp/sites.py", "if not -n <= i < n:", "if not -n <= i <= n:", "resolved_sites"),
]
only = sys.argv[1:]
# fork server: heavy third-party imports once; each child imports interp (mutated) fresh and runs pytest
os.environ["OMP_NUM_THREADS"] = "1"
import torch, transformers, pandas, pytest, PIL.Image, nnsight  # noqa
import transformers.models.llava.modeling_llava, transformers.models.qwen2_vl.modeling_qwen2_vl
import transformers.models.gemma3.modeling_gemma3  # noqa
torch.set_num_threads(1)
os.chdir(ROOT)
sys.path.insert(0, ROOT)

def run_child(k):
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.path.join(ROOT, "docs", "mutation", "last_child.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC); os.dup2(fd, 1); os.dup2(fd, 2)
        rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:anyio", "tests/test_mutants.py", "-k", k])
        os._exit(int(rc))
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st)

results = []
assert run_child("") == 0, "the unmutated tests must pass"
for mid, f, old, new, k in M:
    if only and not any(o in mid for o in only):
        continue
    p = Path(ROOT, f)
    src = p.read_text()
    n = src.count(old)
    if n != 1 or old == new:
        results.append((mid, "BAD-PATTERN", n))
        print(mid, "BAD-PATTERN", n, flush=True)
        continue
    p.write_text(src.replace(old, new))
    try:
        rc = run_child(k)
        status = "KILLED" if rc == 1 else f"SURVIVED(rc={rc})"
    finally:
        p.write_text(src)
    results.append((mid, status, k)); print(mid, status, k, flush=True)
print(f"{sum(r[1] == 'KILLED' for r in results)} of {len(results)} killed")
