"""Causal maps by resuming the LM (interp.resume.capture_lm / resume, the resumed scheme of
interp.patching.run_patches): a patch at block ℓ runs blocks ℓ+1… only, over the positions from
its first patched one on, with the unpatched run's masks, rotary embeddings, keys and values.
Checked against full forwards (the reference scheme) on all five architectures, with and without
interventions; Gemma3's bidirectional image attention moves the reusable prefix back to the
image's start.

Bugs these catch: a block input not passed again (mask, rotary or ids: the resumed rows differ),
a prefix that ends inside a bidirectional span (Gemma3: tested to change the numbers when the rule
is skipped), a mask sliced on the wrong axis or top-left aligned causal masking, rows gathered from
the wrong unpatched row, an intervention edit inside the blocks silently dropped (refused instead).
"""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import interp
from helpers import mirrored_pair
from interp import patching, tiny
from interp.dispatch import forward
from interp.tracing import trace
from interp.resume import capture_lm, resume
from spatialbias.errors import SpatialBiasError
from interp.interventions import AGCI, BaPA, Intervention, Knockout, PositionSwap

NAMES = list(tiny.BUILDERS)


def make(name, n=3, dtype=None):
    model, proc = tiny.BUILDERS[name]()
    m = interp.load(model if dtype is None else model.to(dtype), proc)
    qs = [m.prompt("what is this ?"), m.prompt("what is this a picture of ?"), m.prompt("what is this ?")][:n]
    return (m, *mirrored_pair(m, n, questions=qs))  # rows of different lengths: left padding, real masks


@pytest.fixture(scope="module", params=NAMES)
def arch(request):
    return (request.param, *make(request.param))


def test_resuming_from_every_block_reproduces_the_run(arch):
    name, m, clean, _, _, _ = arch
    with torch.no_grad():
        _, st = capture_lm(m, clean)
        ref = m.run(clean, last_only=True)[:, -1]
        img = m.image_map(clean).is_image
        for row in range(2):
            p = st.prefix(row, int(img[row].nonzero()[0]))
            for s in range(st.layers + 1):
                got = resume(m, st, torch.tensor([row]), torch.tensor([s]), st.residual[s][row:row + 1, p:], p)
                assert torch.allclose(got, ref[row:row + 1], atol=1e-5), (name, row, s)


@pytest.mark.parametrize("ivs", ["none", "bapa", "agci", "knockout", "swap"])
def test_resumed_patching_equals_one_full_forward_per_patch(arch, ivs):
    name, m, clean, corrupt, correct, cands = arch
    n = m.adapter.layer_count(m.model, "lm")
    a = m.adapter.attention_layers(m.model)[0]  # 0, or a hybrid LM's first attention layer
    iv = {"none": [], "bapa": [BaPA()], "agci": [AGCI(lam=0.5)],
          "knockout": [Knockout(cells=(0,), query="text", layers=(a, a + 1))],
          "swap": [PositionSwap(a=0, b=8, layers=(1, 2))]}[ivs]
    ps = patching.default_patches(m) + [patching.Patch("lm.blocks.0.mlp", "image"),
                                        patching.Patch(f"lm.blocks.{n - 1}", position=5)]
    full = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, iv, resume=False)
    for bs in (64, 4):
        res = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, iv, resume=True,
                                   batch_size=bs)
        assert res.attrs["engine"] == "resumed" and full.attrs["engine"] == "full"
        assert res[["item", "site", "group"]].equals(full[["item", "site", "group"]])
        for col in ("metric", "base_metric", "source_metric"):
            assert (res[col] - full[col]).abs().max() < 1e-5, (name, ivs, bs, col)


@pytest.mark.parametrize("name", ["qwen3vl", "qwen3vl_moe"])
def test_deepstack_features_move_with_lm_patches(name):
    """A patch of every image token at ``lm.input``, or of every position at a site before the
    last DeepStack addition (the block's output, taken before it; the block's input), gives the
    source run exactly, in both schemes: the source's later DeepStack features move with the
    patched image tokens. (Kept from the base run, they would mix two placements' features at
    one position: the test checks the placements' features differ, so it is informative.)"""
    m, clean, corrupt, correct, cands = make(name)
    inj = m.adapter.injections(m.model)
    k = max(inj)
    feats = [trace(m, x, cache=[inj[k]]).cache[inj[k]] for x in (clean, corrupt)]
    assert not torch.allclose(*feats)
    ps = [patching.Patch("lm.input", "image"), patching.Patch(f"lm.blocks.{k}", "all"),
          patching.Patch(f"lm.blocks.{k}#input", "all")]
    for resume in (False, True):
        df = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, resume=resume)
        assert (df.metric - df.source_metric).abs().max() < 1e-5, (resume, df)
        assert (df.base_metric - df.source_metric).abs().min() > 1e-3  # the patch had a gap to close


def test_gemma3_prefix_ends_where_the_image_begins():
    m, clean, corrupt, correct, cands = make("gemma3")
    cells = m.image_map(corrupt).cells(3, 3)[0]
    image = (cells >= 0).nonzero().flatten()
    inside = int(image[1])  # the image's second token: cells 6 and 8 start inside the image
    with torch.no_grad():
        _, st = capture_lm(m, corrupt)
    assert st.prefix(0, inside) == int(image[0])  # bidirectional image: its tokens see later ones
    assert st.prefix(0, int(image[-1]) + 2) == int(image[-1]) + 2  # causal text after it: unchanged
    ps = [patching.Patch("lm.input", "target"), patching.Patch("lm.blocks.0", "target")]
    targets = [(6, 8)] * 3
    full = patching.run_patches(m, corrupt, clean, ps, correct, cands, targets, resume=False)
    res = patching.run_patches(m, corrupt, clean, ps, correct, cands, targets, resume=True)
    assert (res.metric - full.metric).abs().max() < 1e-5
    # the rule matters: reusing keys and values up to the first patched token inside the image is wrong
    import interp.resume as d
    keep = d.LMStates.prefix
    try:
        d.LMStates.prefix = lambda self, row, first: first
        wrong = patching.run_patches(m, corrupt, clean, ps, correct, cands, targets, resume=True)
    finally:
        d.LMStates.prefix = keep
    assert (wrong.metric - full.metric).abs().max() > 1e-3


@dataclass(frozen=True)
class _MlpScale(Intervention):
    kind: ClassVar[str] = "test_mlp_scale"

    def edits(self, lvlm, batch):
        return {"lm.blocks.0.mlp": lambda x: 2 * x}


def test_an_edit_inside_the_blocks_runs_full_forwards_or_is_refused():
    m, clean, corrupt, correct, cands = make("llava")
    ps = [patching.Patch("lm.blocks.0", "image"), patching.Patch("lm.input", "last")]
    auto = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, [_MlpScale()])
    full = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, [_MlpScale()], resume=False)
    assert auto.attrs["engine"] == "full" and auto.equals(full)
    with pytest.raises(SpatialBiasError, match="lm.blocks.0.mlp inside the LM blocks"):
        patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, [_MlpScale()], resume=True)


def test_bf16_resumed_patching_matches_full_forwards():
    m, clean, corrupt, correct, cands = make("qwen25vl", dtype=torch.bfloat16)
    ps = patching.default_patches(m)
    full = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, resume=False)
    res = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, resume=True)
    assert res.attrs["engine"] == "resumed"
    assert (res.metric - full.metric).abs().max() <= 1e-2  # observed 0.0 on the tiny models


def test_a_stopped_run_and_disk_caches(tmp_path):
    m, clean, _, _, _ = make("llava")
    sites = ["projector", "lm.input", "lm.blocks.1"]
    ref = forward(m, clean, cache=sites)
    stopped = forward(m, clean, cache=["lm.input"], stop=True)
    assert stopped.logits is None and torch.equal(stopped.cache["lm.input"], ref.cache["lm.input"])
    disk = forward(m, clean, cache=sites, to_disk=tmp_path / "cache")
    for s in sites:
        assert torch.equal(disk.cache[s], ref.cache[s]) and disk.cache[s].dtype == ref.cache[s].dtype
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["lm.blocks.1.0.bin", "lm.input.0.bin", "projector.0.bin"]
    assert (tmp_path / "cache" / "lm.input.0.bin").stat().st_size == ref.cache["lm.input"].numel() * 4
    with pytest.raises(SpatialBiasError, match="give cache"):
        forward(m, clean, stop=True)
