"""The dry run's placement under ``--device-map`` (analyses/placement.py) is the placement a load
makes: on saved tiny checkpoints of LLaVA, Qwen3-VL-MoE and InternVL, with a CPU budget that
forces a CPU/disk split, the predicted map equals ``interp.load(...).model.hf_device_map`` and the
predicted bytes per device equal what the loaded model stores there; over fake GPU budgets the
peaks follow the layers each device holds; weights that would go to disk without an offload
folder are refused in one line."""
from __future__ import annotations

import pytest
import torch

import interp
from analyses import estimate, placement
from analyses.memory_model import Shapes, activation_peak
from analyses.plan import Condition
from interp import tiny
from spatialbias.errors import SpatialBiasError


@pytest.fixture(scope="module", params=["llava", "qwen3vl_moe", "internvl"])
def saved(request, tmp_path_factory):
    model, proc = tiny.BUILDERS[request.param](seed=0)
    folder = tiny.save(model, proc, tmp_path_factory.mktemp(request.param) / "ckpt")
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return str(folder), total


def _cond(folder: str, analysis: str = "eval") -> Condition:
    return Condition("tiny", folder, "p", "", "baseline", "baseline", None, (), analysis, 0,
                     {"dtype": "float32", "batch_size": 4}, folder, "/nonexistent/probe")


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_predicted_map_is_the_loaded_map(saved, strategy, tmp_path):
    folder, total = saved
    budget = {"cpu": int(0.6 * total)}  # leaves the rest of the blocks for disk
    p = placement.predict(folder, "float32", strategy, budget, offload_folder=str(tmp_path / "off"))
    lvlm = interp.load(folder, dtype=torch.float32, device_map=strategy, max_memory=budget,
                       offload_folder=tmp_path / "off")
    assert p.device_map == dict(lvlm.model.hf_device_map)
    assert set(p.weights) == {"cpu", "disk"} and p.execution == "cpu"
    got = lvlm.weight_bytes()
    for dev in ("cpu", "disk"):  # non-persistent buffers aside (rotary tables: bytes)
        assert abs(p.weights[dev] - got[dev]) <= 0.01 * got[dev], (dev, p.weights, got)
    lm = [i for v in p.lm_layers.values() for i in v]
    assert sorted(lm) == list(range(lvlm.adapter.layer_count(lvlm.model, "lm")))
    assert p.largest_offloaded > 0  # disk blocks are read into CPU memory for their forward


def test_fake_gpus_place_in_module_order_and_price_their_own_layers(saved):
    folder, total = saved
    gpus = {0: int(0.45 * total), 1: int(0.45 * total), "cpu": 10 * total}
    p = placement.predict(folder, "float32", "sequential", gpus)
    assert p.main == "cuda:0" and list(p.weights)[:2] == ["cuda:0", "cuda:1"]  # GPUs filled in order
    placed = [(int(d[5:]), i) for d, ix in p.vision_layers.items() if d.startswith("cuda") for i in ix]
    assert placed == sorted(placed)  # vision blocks first, in module order
    embed = lvlm_embed(folder)
    assert p.execution == placement.label(next(v for k, v in p.device_map.items() if embed.startswith(k)))
    cfg = estimate._config(folder)
    s = Shapes.from_config(cfg, "float32", image_px=(48, 48))
    acts = placement.device_activations(s, "attribution", 8, p)
    assert acts[p.execution] == activation_peak(s, "attribution", 8)
    assert acts["cpu"] == 0 and p.lm_layers.get("cpu")  # CPU blocks compute on cuda:0, the main device
    if p.execution != "cuda:0":
        assert 0 < acts["cuda:0"] < acts[p.execution]
    peaks = placement.device_peaks(s, ("forward", "attribution"), 8, p)
    assert peaks["cuda:0"] == p.weights["cuda:0"] + p.largest_offloaded + acts["cuda:0"] > p.weights["cuda:0"]
    assert peaks["cpu"] == p.weights["cpu"]
    rows = placement.device_table("tiny", p, peaks)
    assert [r["device"] for r in rows] == list(p.weights)
    assert [r["device"] for r in rows if r["inputs"]] == [p.execution]


def lvlm_embed(folder: str) -> str:
    """HF path of the input embeddings of a saved checkpoint (through its adapter)."""
    model, adapter = placement._meta_model(folder, "float32")
    return adapter.path("lm.embed", model)


def test_dry_run_rows_per_device(saved, tmp_path):
    folder, total = saved
    settings = {"device_map": "auto", "max_memory": {"cpu": int(0.6 * total)}, "offload_folder": str(tmp_path)}
    rows, peak, note = estimate.memory_row(_cond(folder), settings)
    table = estimate.device_rows([_cond(folder), _cond(folder, "attribution")], settings)
    assert rows == 4 and "execution device's (cpu)" in note
    assert {r["device"] for r in table} == {"cpu", "disk"}
    cpu = next(r for r in table if r["device"] == "cpu")
    p = placement.predict(folder, "float32", "auto", settings["max_memory"], str(tmp_path))
    assert peak > p.weights["cpu"] + p.largest_offloaded  # the execution device's weights + activations
    assert cpu["weights_GiB"] == round(p.weights["cpu"] / 2 ** 30, 2)
    assert cpu["peak_GiB"] >= round(peak / 2 ** 30, 2)  # attribution's step is larger than eval's


def test_refused_when_weights_would_go_to_disk_without_a_folder(saved):
    folder, total = saved
    settings = {"device_map": "auto", "max_memory": {"cpu": int(0.6 * total)}}
    with pytest.raises(SpatialBiasError, match=r"would go to disk; raise --max-memory .* --offload-folder"):
        placement.predict(folder, "float32", "auto", settings["max_memory"])
    rows, peak, note = estimate.memory_row(_cond(folder), settings)
    assert rows == 0 and peak is None and "do not fit --max-memory cpu=" in note and "\n" not in note
    assert estimate.device_rows([_cond(folder)], settings) == []
