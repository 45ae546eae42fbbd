"""Replay every surviving mutant classed "closed" (docs/mutation/survivors.csv) on the current code.

For each such mutant whose diff is one line and whose original line occurs exactly once (after
stripping indentation) in today's module, the mutated line is written in its place, the tests of
tests/test_mutants.py for that function run in a forked child, and the file is restored. The test
must fail (pytest exit code 1). Mutants whose line changed since fe4f911 or spans several lines
are reported as NOT-APPLICABLE (docs/mutation/hand_mutations.py applies those by hand).

    python docs/mutation/replay_closed.py            # prints one line per mutant and a summary
Do not edit interp/ or tests/ while it runs.
"""
import os
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
TESTS = {  # function → pytest -k expression of the tests written for it
    "query_rows": "cell_flow_text", "cell_flow": "cell_flow_text", "Knockout.decode_edits": "column_0",
    "Batch.need_one_image_per_row": "validate_fills", "validate": "validate_fills",
    "_left_padded": "rolls_every_plane or padding_holes", "select_rows": "select_rows_and_concat or after_the_image or one_line_refusals",
    "bapa_position_ids": "one_line_refusals", "from_dict": "one_line_refusals",
    "concat": "select_rows_and_concat", "then": "then_runs", "_Run.__init__": "change_shape_or_never",
    "_Run._visit": "change_shape_or_never", "_Run.end_forward": "change_shape_or_never",
    "_Run._image_tokens": "per_head_site", "_Run._matching": "rotary_call_labels",
    "build": "three_images or non_square", "from_fields": "non_square", "agci_inject": "agci_inject_is",
    "AdaptiveAGCI.strength": "scale_and_cap", "AdaptiveAGCI.lambdas": "scale_and_cap",
    "PositionPermute.position_ids": "fixed_by_its_seed", "group_masks": "text_group",
    "_check_site": "without_tokens", "site_groups": "grid_reaches", "_selection": "single_position",
    "run_patches": "refuses_mismatched or single_position or under_the_interventions or grid_reaches",
    "restoration": "restoration_table", "default_patches": "default_patches",
    "resolve": "resolved_sites", "every_site": "resolved_sites", "_with_key": "resolved_sites",
    "_layer_index": "resolved_sites",
}
FILES = {"interventions": ["interp/interventions/agci.py", "interp/interventions/controls.py",
                           "interp/interventions/bapa.py", "interp/interventions/base.py"]}

os.environ["OMP_NUM_THREADS"] = "1"
import pytest
import torch
import transformers  # noqa: F401

torch.set_num_threads(1)
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))


def run_child(k: str) -> int:
    pid = os.fork()
    if pid == 0:
        fd = os.open(ROOT / "docs" / "mutation" / "last_child.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:anyio", "tests/test_mutants.py",
                                  "-k", k])))
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main():
    df = pd.read_csv(ROOT / "docs" / "mutation" / "survivors.csv").fillna("")
    df = df[df["class"] == "closed"]
    assert run_child("") == 0, "the unmutated tests must pass"
    counts: dict[str, int] = {}
    for r in df.itertuples():
        files = FILES.get(r.module, [f"interp/{r.module}.py"])
        hits = []
        for f in files:
            lines = (ROOT / f).read_text().split("\n")
            hits += [(f, i) for i, line in enumerate(lines) if line.strip() == r.before]
        if len(hits) != 1 or not r.after or r.before.count("\n"):
            status = "NOT-APPLICABLE"
        else:
            f, i = hits[0]
            p = ROOT / f
            src = p.read_text()
            lines = src.split("\n")
            lines[i] = lines[i][:len(lines[i]) - len(lines[i].lstrip())] + r.after
            p.write_text("\n".join(lines))
            try:
                rc = run_child(TESTS[r.function])
            finally:
                p.write_text(src)
            status = "KILLED" if rc == 1 else f"SURVIVED(rc={rc})"
        counts[status] = counts.get(status, 0) + 1
        print(r.name, status, flush=True)
    print(counts)


if __name__ == "__main__":
    main()
