"""Models larger than one device: accelerate's big-model dispatch (``interp.load(...,
device_map=..., offload_folder=...)``). A tiny model of every architecture is split across the
CPU and disk offload in two ways — (a) the LM's layers split in two halves (first half in memory,
second half on disk, as a 2-way split across two devices would cut them) with the vision side and
the unembedding on disk; (b) accelerate's own ``"auto"`` placement of an in-memory model under a
``max_memory`` too small for it, so the rest goes to disk — and every runner must give exactly the
undispatched result: logits, generation, interventions, caches, patching tables, attention flow,
knockout and attribution.

Bugs these catch: an edit building its tensors from ``next(model.parameters())`` (a meta tensor
under disk offload: PositionSwap's per-layer rotary did), inputs sent to a meta / wrong device
(``LVLM.device``), a map that silently leaves the model whole (asserted: weights on disk).
"""
import pytest
import torch

import interp
from interp import attention, attribution, patching, tiny
from spatialbias.errors import SpatialBiasError
from interp.interventions import AGCI, BaPA, Knockout, PositionSwap
from interp.load import parse_max_memory, parse_size
from interp.tracing import trace
from helpers import stand_in_timm

NAMES = list(tiny.BUILDERS)


def split_map(m) -> dict:
    """LM blocks: first half "cpu", second half "disk"; the rest of the LM "cpu"; vision side,
    projector and (unless tied to the embeddings) the unembedding "disk"."""
    n = m.adapter.layer_count(m.model, "lm")
    layers = m.adapter.path("lm.blocks.0", m.model).rsplit(".", 1)[0]
    lm = layers.rsplit(".", 1)[0]
    top = dict(m.model.named_modules())
    dm = {f"{layers}.{i}": ("cpu" if i < n // 2 else "disk") for i in range(n)}
    dm.update({f"{lm}.{c}": "cpu" for c, _ in top[lm].named_children() if f"{lm}.{c}" != layers})
    dm.update({f"model.{c}": "disk" for c, _ in m.model.model.named_children() if f"model.{c}" != lm})
    dm.update({f"model.{c}": "cpu" for c, _ in m.model.model.named_parameters(recurse=False)})
    tied = m.model.lm_head.weight is m.model.get_input_embeddings().weight
    dm["lm_head"] = "cpu" if tied else "disk"  # accelerate keeps tied weights together
    return dm


@pytest.fixture(scope="module", params=[(n, how) for n in NAMES for how in ("split", "auto")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    name, how = request.param
    model, proc = tiny.BUILDERS[name]()
    folder = tmp_path_factory.mktemp(f"{name}-{how}")
    tiny.save(model, proc, folder / "ckpt")
    with stand_in_timm():  # a Gemma3n folder loads where timm is missing
        plain = interp.load(folder / "ckpt")
    if how == "split":
        with stand_in_timm():
            m = interp.load(folder / "ckpt", device_map=split_map(plain), offload_folder=folder / "offload")
    else:  # in memory, accelerate's own placement under a budget of half the weights
        m2, p2 = tiny.BUILDERS[name]()
        budget = sum(t.numel() * t.element_size() for t in m2.parameters()) // 2
        m = interp.load(m2, p2, device_map="auto", max_memory={"cpu": budget}, offload_folder=folder / "offload")
    assert m.dispatched and m.weight_bytes().get("disk", 0) > 0, m.weight_bytes()
    assert m.device == torch.device("cpu")
    n = 2
    imgs = [tiny.image(48, 48, seed=s) for s in range(n)]
    qs = [plain.prompt("what is this ?"), plain.prompt("what is this a picture of ?")]
    clean = plain.inputs(imgs, qs)
    corrupt = plain.inputs([im.transpose(0).transpose(1) for im in imgs], qs)
    cands = [plain.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]
    return name, plain, m, clean, corrupt, torch.tensor(cands[:n]), cands


def _same(a, b, what):
    if isinstance(a, torch.Tensor):
        same_nan = torch.equal(a.isnan(), b.isnan())  # flow: NaN on a hybrid LM's layers without attention
        assert same_nan and torch.equal(a.nan_to_num(), b.nan_to_num()), (what, (a.float() - b.float()).abs().max())
    else:
        assert a.equals(b), (what, a, b)


def test_every_runner_gives_the_undispatched_result(pair):
    name, plain, m, clean, corrupt, correct, cands = pair
    n = plain.adapter.layer_count(plain.model, "lm")
    att = plain.adapter.attention_layers(plain.model)  # every layer, or a hybrid LM's attention layers
    n_vis = plain.adapter.layer_count(plain.model, "vision")  # 0: a tower without canonical blocks (Gemma3n)
    runs = {
        "run": lambda x: x.run(clean),
        "generate": lambda x: x.generate(clean, max_new_tokens=3),
        "bapa": lambda x: x.run(clean, [BaPA()]),
        "agci": lambda x: x.run(clean, [AGCI(lam=0.5)]),
        "position swap in one layer": lambda x: x.run(clean, [PositionSwap(a=0, b=8, layers=(att[-1], att[-1] + 1))]),
        "knockout": lambda x: x.run(clean, [Knockout(cells=(0,), query="text")]),
        "knockout, generated": lambda x: x.generate(clean, [Knockout(cells=None, query="text")],
                                                    max_new_tokens=2),
        "flow": lambda x: attention.cell_flow(x, clean),
        "trace": lambda x: torch.cat([v.flatten().float() for v in trace(
            x, clean, cache=["vision.blocks.0" if n_vis else "vision.out", "projector", "lm.input", f"lm.blocks.{att[0]}.attn.heads",
                             f"lm.blocks.{n - 1}"]).cache.values()]),
        "trace, image positions": lambda x: trace(x, clean, cache=["projector"], positions="image").cache["projector"],
    }
    with torch.no_grad():
        for what, fn in runs.items():
            _same(fn(plain), fn(m), what)
    ps = [patching.Patch("vision.blocks.0" if n_vis else "vision.out"), patching.Patch("projector"), patching.Patch("lm.input", "target"),
          patching.Patch("lm.blocks.0", "image"), patching.Patch(f"lm.blocks.{n - 1}", "last"),
          patching.Patch("lm.blocks.0.mlp", "text")]
    for resume in (True, False):
        a = patching.run_patches(plain, corrupt, clean, ps, correct, cands, [(0, 8)] * 2, resume=resume)
        b = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 2, resume=resume)
        assert b.attrs["engine"] == ("resumed" if resume else "full")
        _same(a, b, f"patching, resume={resume}")
    _same(attribution.attribution_patching(plain, corrupt, clean, ps[:5], correct, cands, [(0, 8)] * 2),
          attribution.attribution_patching(m, corrupt, clean, ps[:5], correct, cands, [(0, 8)] * 2), "attribution")


def test_placement_errors_are_one_line(tmp_path):
    model, proc = tiny.build_llava()
    with pytest.raises(SpatialBiasError, match="both given"):
        interp.load(model, proc, device="cpu", device_map="auto")
    with pytest.raises(SpatialBiasError, match="need device_map"):
        interp.load(model, proc, max_memory={"cpu": 10 ** 9})
    with pytest.raises(SpatialBiasError, match="offload_folder"):
        interp.load(model, proc, device_map={"": "disk"})
    with pytest.raises(SpatialBiasError, match="use auto, balanced"):
        interp.load(model, proc, device_map="everywhere")
    assert parse_size("1.5GiB") == int(1.5 * 2 ** 30) and parse_size("20GB") == 20 * 10 ** 9
    assert parse_max_memory("0=20GiB, cpu=1TiB") == {0: 20 * 2 ** 30, "cpu": 2 ** 40}
    with pytest.raises(SpatialBiasError, match="not a size"):
        parse_max_memory("cpu=lots")
