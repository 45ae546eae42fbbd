"""Row chunks chosen by the memory model (analyses.memory, analyses.estimate): every analysis gives
its one-forward result (to float32 rounding, see TOL) when cut into chunks of rows (eval forwards, knockout, position-id
patching, attention flow, activation patching, attribution including its backward), and a budget
that cannot hold one step refuses with one line naming --max-memory.

Bugs these catch: a chunk loop that drops or repeats the last partial chunk, rows of one chunk
paired with another chunk's answers (``correct[rows]``), a query-row selection computed over the
whole batch instead of the chunk, a budget check that lets a step through that cannot fit.
"""
import pytest
import torch

import interp
from helpers import mirrored_pair
from analyses import causal, estimate, memory
from interp import attention, attribution, patching, tiny
from spatialbias.errors import SpatialBiasError


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def setup(request):
    model, proc = tiny.BUILDERS[request.param]()
    m = interp.load(model, proc)
    n = 5
    qs = [m.prompt("what is this ?"), m.prompt("what is this a picture of ?")] * 3
    clean, corrupt, correct, cands = mirrored_pair(m, n, questions=qs[:n])
    pairs = causal.Pairs(clean=clean, corrupt=corrupt, correct=correct, candidates=cands, targets=[(0, 8)] * n,
                         ids=list(range(n)), clean_cell=0, corrupt_cell=8, grid=(3, 3))
    return m, pairs


TOL = 1e-6
"""Chunks equal one forward up to float32 rounding, not bit for bit: the CPU's matrix products
block their sums by the number of rows, so 2 rows and 5 rows round differently (measured: up to
1.2e-7 on logits of ~0.3 here). A misassigned row or a lost chunk moves values by ~0.1."""


def _same(a, b):
    if not isinstance(a, torch.Tensor):
        assert list(a.columns) == list(b.columns) and a.shape == b.shape
        assert a.select_dtypes(exclude="number").equals(b.select_dtypes(exclude="number"))
        a, b = (torch.tensor(x.select_dtypes("number").to_numpy(dtype=float)) for x in (a, b))
    assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=TOL, equal_nan=True), (a - b).abs().max()


def test_forward_analyses_equal_in_chunks(setup):
    m, pairs = setup
    _same(torch.tensor(causal.item_metric(m, pairs.clean, pairs, [], 2)),
          torch.tensor(causal.item_metric(m, pairs.clean, pairs, [])))
    _same(causal.knockout_items(m, pairs, [], batch_size=2), causal.knockout_items(m, pairs, []))
    _same(causal.position_items(m, pairs, [], batch_size=3), causal.position_items(m, pairs, []))
    _same(attention.cell_flow(m, pairs.clean, batch_size=2), attention.cell_flow(m, pairs.clean))
    _same(attention.cell_flow(m, pairs.clean, query="text", batch_size=1),
          attention.cell_flow(m, pairs.clean, query="text"))


def test_patching_and_attribution_equal_in_chunks(setup):
    m, pairs = setup
    ps = patching.default_patches(m)
    args = (pairs.corrupt, pairs.clean, ps, pairs.correct, pairs.candidates, pairs.targets)
    _same(patching.run_patches(m, *args, batch_size=4), patching.run_patches(m, *args, batch_size=64))
    _same(attribution.attribution_patching(m, *args, batch_size=2),  # one item per chunk, backward included
          attribution.attribution_patching(m, *args, batch_size=64))
    _same(attribution.attribution_patching(m, *args, steps=3, batch_size=4),
          attribution.attribution_patching(m, *args, steps=3, batch_size=64))


def test_rows_fill_the_budget_and_refuse_below_one_step(setup):
    m, pairs = setup
    s = memory.run_shapes(m, pairs.clean)
    assert s.seq_len == pairs.clean["input_ids"].shape[1] and s.vision_tokens > 0
    for analysis in ("eval", "flow", "knockout", "patching", "attribution"):  # an analysis or a step's profile
        kind, = estimate.profiles(analysis)
        lo = estimate.MIN_ROWS.get(kind, 1)
        room = estimate.activation_peak(s, kind, lo + 3)  # exactly what lo + 3 rows need
        r = memory.rows(m, room, analysis, pairs.clean, limit=64)
        assert r >= lo + 3, (analysis, r)  # patching's peak steps by items (2 rows): 7 rows may fit as 6 do
        assert estimate.activation_peak(s, kind, r) <= room < estimate.activation_peak(s, kind, r + 1)
        assert memory.rows(m, room, analysis, pairs.clean, limit=lo + 1) == lo + 1
        with pytest.raises(SpatialBiasError, match="--max-memory") as e:
            memory.rows(m, estimate.activation_peak(s, kind, lo) - 1, analysis, pairs.clean, limit=64)
        assert "\n" not in str(e.value)
    assert memory.rows(m, None, "flow", pairs.clean, limit=7) == 7


def test_budget_reads_max_memory_for_the_execution_device(setup):
    m, _ = setup
    w = m.weight_bytes()["cpu"]
    assert memory.budget(m, {"cpu": w + 1000}) == 1000
    assert memory.budget(m, {"all": w + 5}) == 5
    assert memory.budget(m, None) > 0  # the available RAM
    with pytest.raises(SpatialBiasError, match="--max-memory"):
        memory.rows(m, memory.budget(m, {"cpu": w // 2}), "eval", setup[1].clean, limit=8)


# ------------------------------------------------------------------------------------------------
# the placement and budget flags through the command line (dry runs on the organism)


def _dry(args, tmp_path):
    from typer.testing import CliRunner

    from analyses.cli import app
    r = CliRunner().invoke(app, ["causal", "--probe", str(tmp_path / "probe"), "--out", str(tmp_path / "o"),
                                 "--n-items", "4", "--dry-run", *args])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    from probes.build import shapes_probe
    d = tmp_path_factory.mktemp("cli")
    shapes_probe(d / "probe", n_items=4, seed=3, progress=False)
    return d


def _ids(out: str) -> list[str]:
    return sorted(ln.split()[0] for ln in out.splitlines() if ln[:12].isalnum() and len(ln.split()[0]) == 12)


def test_dtype_enters_ids_and_placement_does_not(probe_dir):
    code, plain = _dry([], probe_dir)
    assert code == 0 and "predicted peak" in plain, plain
    code, bf16 = _dry(["--dtype", "bfloat16"], probe_dir)
    assert code == 0 and set(_ids(bf16)).isdisjoint(_ids(plain))  # dtype changes numbers: new conditions
    code, placed = _dry(["--device-map", "auto", "--max-memory", "cpu=8GiB", "--offload-folder",
                         str(probe_dir / "off")], probe_dir)
    assert code == 0 and _ids(placed) == _ids(plain), placed  # placement changes no number: same conditions
    # a split model's weights are placed by accelerate: the dry run predicts that placement per device and
    # prices the execution device (its weights + the step's activations), and says so
    assert "predicted peak (weights + activations on the execution device, GiB)" in placed, placed
    assert "predicted placement per device" in placed and "split by --device-map" in placed, placed
    assert "predicted peak (weights + activations, GiB)" in plain, plain


def test_max_memory_too_small_names_the_flag(probe_dir):
    code, out = _dry(["--max-memory", "1MiB"], probe_dir)
    assert code == 0 and "memory:" in out and "--max-memory" in out, out  # the dry run says it will not fit
    notes = [ln for ln in out.splitlines() if ln.startswith("memory:")]
    assert notes and all("--max-memory" in ln for ln in notes)
    code, big = _dry(["--max-memory", "100GiB"], probe_dir)
    assert code == 0 and "memory:" not in big


def test_placement_flag_errors_are_one_line(probe_dir):
    code, out = _dry(["--offload-folder", str(probe_dir / "off")], probe_dir)
    assert code != 0 and "device_map" in out and len(out.strip().splitlines()) == 1, out
    code, out = _dry(["--max-memory", "lots"], probe_dir)
    assert code != 0 and "--max-memory" in out and len(out.strip().splitlines()) == 1, out
    code, out = _dry(["--device", "cpu", "--device-map", "auto"], probe_dir)
    assert code != 0 and "--device-map" in out and len(out.strip().splitlines()) == 1, out


def test_eval_dispatched_or_chunked_equals_the_plain_run(tiny_probe_eval):
    plain = tiny_probe_eval.pop("plain")
    for name, other in tiny_probe_eval.items():
        assert plain[["metric", "cell"]].equals(other[["metric", "cell"]]), name
        diff = (plain.value - other.value).abs().max()
        assert diff <= TOL, (name, diff)  # chunks of a few rows: float32 rounding only (see TOL)


@pytest.fixture(scope="module")
def tiny_probe_eval(probe_dir):
    """``spatialbias eval`` on the organism: plain; split to disk under a 1 MiB weight budget; and
    with --max-memory the weights plus what two rows need (chunks of 2 rows)."""
    import pandas as pd
    from typer.testing import CliRunner

    from analyses.cli import app
    from analyses import memory
    from analyses.evaluate import probe_batches
    from probes.format import read_rows
    m = interp.load("organism")
    _, _, _, x = next(probe_batches(m, probe_dir / "probe", read_rows(probe_dir / "probe")[:8], 8))
    two_rows = m.weight_bytes()["cpu"] + estimate.activation_peak(memory.run_shapes(m, x), "forward", 2)
    assert memory.rows(m, two_rows - m.weight_bytes()["cpu"], "eval", x, 64) == 2  # the budget forces 2-row chunks
    out = {}
    for name, extra in (("plain", []), ("placed", ["--device-map", "auto", "--max-memory", "cpu=1MiB",
                                                   "--offload-folder", str(probe_dir / "off2")]),
                        ("chunked", ["--max-memory", f"cpu={two_rows}B"])):
        r = CliRunner().invoke(app, ["eval", "--model", "organism", "--probe", str(probe_dir / "probe"), "--out",
                                     str(probe_dir / name), "--condition", "baseline", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        df = pd.read_parquet(probe_dir / name / "results.parquet")
        out[name] = df.sort_values(["metric", "cell"]).reset_index(drop=True)[["metric", "cell", "value"]]
    return out


def test_dry_run_reads_a_hub_models_config_from_the_hf_cache(tmp_path):
    """A hub id (no local folder) gets its memory estimate from config.json in the HF cache, read
    where huggingface_hub keeps it (refs/main → snapshots/<rev>/); nothing is downloaded."""
    import os
    import subprocess
    import sys

    from interp import realshape
    snap = tmp_path / "hub" / "models--someone--llava-7b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    realshape.llava_15_7b_config(32, 24).save_pretrained(snap)
    (tmp_path / "hub" / "models--someone--llava-7b" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--llava-7b" / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "analyses.cli", "report", "--model", "someone/llava-7b", "--dry-run",
                        "--dtype", "bfloat16", "--max-memory", "40GiB", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    peaks = next(ln for ln in r.stdout.splitlines() if ln.startswith("predicted peak (weights + activations"))
    # 7B in bf16 is 13.2 GiB of weights; under --max-memory 40GiB every analysis's peak stays below it
    values = [float(x.split()[-1]) for x in peaks.split(":", 1)[1].split(",")]
    assert all(13 < v <= 40 for v in values), peaks


def _onevision_7b_config():
    """LLaVA-OneVision-Qwen2-7B shapes: SigLIP so400m (384 px, 14 px patches, 26 blocks) + Qwen2-7B."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                            image_size=384, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, vision_feature_select_strategy="full",
                               vision_feature_layer=-1)
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return cfg


def test_onevision_shapes_from_config_count_the_processors_tokens():
    """The memory model's image tokens of a LLaVA-OneVision config (its adapter's memory profile)
    equal what the processor makes for that image size, on the tiny model; at the 7B shapes a 384 px
    image is 729 base + 27 × (27 + 1) tile-grid tokens and 2 crops of 729 patches."""
    model, proc = tiny.build_llava_onevision()
    m = interp.load(model, proc)
    for h, w in ((32, 32), (40, 60), (64, 40), (64, 64)):
        x = m.inputs([tiny.image(h, w)], [m.prompt("what is this ?")])
        s = estimate.Shapes.from_config(model.config.to_dict(), image_px=(h, w))
        assert s.image_tokens == int(m.image_mask(x["input_ids"]).sum()), (h, w)
        assert s.vision_tokens == m.adapter.vision_tokens(model, x) == memory.vision_tokens_per_row(m, x), (h, w)
    s = estimate.Shapes.from_config(_onevision_7b_config().to_dict(), "bfloat16", image_px=(384, 384))
    assert (s.image_tokens, s.vision_tokens, s.block_norms, s.qk_norm) == (729 + 27 * 28, 2 * 729, 2, False)
    big = estimate.Shapes.from_config(_onevision_7b_config().to_dict(), "bfloat16", image_px=(2304, 2304))
    assert big.image_tokens == 729 + 81 * 82  # a 6×6 tile grid shrunk to anyres_max_9: 81 × 81 + newlines
    assert 14 * 2 ** 30 < s.weights < 17 * 2 ** 30  # ~8B parameters in bf16


def test_dry_run_of_a_onevision_checkpoint(tmp_path):
    """``report --dry-run`` on a LLaVA-OneVision config.json alone: the memory model reads it through
    the adapter (no model_type table) and predicts a peak per analysis."""
    from helpers import dry_run_peaks
    folder = tmp_path / "ov7b"
    _onevision_7b_config().save_pretrained(folder)
    values = dry_run_peaks(folder, tmp_path / "o")
    assert all(14 < v <= 80 for v in values), values


def test_qwen3vl_shapes_from_config():
    """Qwen3-VL's memory facts come from its adapter (patch layout of Qwen2-VL, q/k norms of Qwen3):
    image tokens equal the tiny processor's count."""
    model, proc = tiny.build_qwen3vl()
    m = interp.load(model, proc)
    for h, w in ((48, 48), (48, 80), (64, 64)):  # within the tiny processor's 64² pixels
        x = m.inputs([tiny.image(h, w)], [m.prompt("what is this ?")])
        s = estimate.Shapes.from_config(model.config.to_dict(), image_px=(h, w))
        assert s.image_tokens == int(m.image_mask(x["input_ids"]).sum()), (h, w)
        assert s.vision_tokens == memory.vision_tokens_per_row(m, x)
        assert s.qk_norm and s.block_norms == 2


def test_memory_model_reads_a_gpt2_spelled_text_config():
    """The learned-absolute organism's GPT-2 LM names its widths n_embd / n_head / n_layer and
    may leave n_inner unset (then 4 × the width): the memory model reads them (it raised KeyError
    'hidden_size' under a budget, so the runner could not chunk that organism's rows)."""
    from pathlib import Path
    m = interp.load(Path(__file__).parent.parent / "analyses" / "organisms" / "checkpoints" / "learned-absolute-seed0")
    tc = m.model.config.text_config
    s = estimate.Shapes.from_config(m.model.config.to_dict())
    assert (s.width, s.heads, s.lm_layers, s.ffn) == (tc.n_embd, tc.n_head, tc.n_layer, tc.n_inner or 4 * tc.n_embd)
    x = m.inputs([tiny.image(48, 48)], [m.prompt("what colour is the circle ?")])
    assert memory.rows(m, 10 ** 9, "forward", x, limit=8) == 8


def test_qwen3vl_moe_shapes_from_config():
    """Qwen3-VL-MoE's memory facts (its adapter): Qwen3-VL's image tokens and q/k norms; the LM
    MLPs' parameters count every expert and router exactly (E·(3 D·Fe + D) per MoE block); a token
    is counted through its top-k experts, not all of them (fewer live elements than E experts)."""
    model, proc = tiny.build_qwen3vl_moe()
    m = interp.load(model, proc)
    x = m.inputs([tiny.image(48, 80)], [m.prompt("what is this ?")])
    cfg = model.config.to_dict()
    s = estimate.Shapes.from_config(cfg, image_px=(48, 80))
    assert s.image_tokens == int(m.image_mask(x["input_ids"]).sum()) and s.qk_norm
    facts = m.adapter.memory_profile(cfg)
    mlps = sum(p.numel() for layer in model.model.language_model.layers for p in layer.mlp.parameters())
    assert facts.lm_mlp_params == mlps
    tc = model.config.text_config
    D, Fe, E, k = tc.hidden_size, tc.moe_intermediate_size, tc.num_experts, tc.num_experts_per_tok
    assert s.mlp == max(k * (D + 3 * Fe), 4 * k * D) < E * (D + 3 * Fe)
