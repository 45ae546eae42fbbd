"""interp.load from a hub id in the local HF cache (offline), and its one-line errors."""
import os
import subprocess
import sys

import torch

import interp
from interp import tiny


def test_hub_id_from_local_cache(tmp_path):
    model, proc = tiny.build_llava()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tinyorg--tiny-llava"
    tiny.save(model, proc, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import torch, interp; from interp import tiny; m = interp.load('tinyorg/tiny-llava'); "
            "x = m.inputs([tiny.image()], [m.prompt('describe the image ?')]); "
            "torch.save(m.run(x).detach(), 'logits.pt'); print(m.source)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("tinyorg/tiny-llava")
    m = interp.load(model, proc)
    with torch.no_grad():
        want = m.run(m.inputs([tiny.image()], [m.prompt("describe the image ?")]))
    # another process, another thread count: equal up to float reduction order
    assert torch.allclose(torch.load(tmp_path / "logits.pt", weights_only=True), want, atol=1e-5)


def test_hub_id_not_in_cache_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "analyses.cli", "report", "--model", "llava-hf/llava-1.5-7b-hf",
                        "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "llava-hf/llava-1.5-7b-hf" in lines[0] and "HF cache" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_gemma3n_is_refused_with_its_reason(tmp_path):
    """Gemma3n needs timm (and so torchvision) for its vision tower, and even with them its per-layer
    inputs and four AltUp streams are out of ``lm.input``'s reach: one line naming both blockers
    and each one's fix, before anything loads (a config-only folder) — not a traceback from timm.
    The evidence for the second blocker is pinned in ``tests/test_gemma3n.py``."""
    import json

    import pytest

    from spatialbias.errors import SpatialBiasError
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3nForConditionalGeneration"],
                                                      "model_type": "gemma3n"}))
    with pytest.raises(SpatialBiasError) as e:
        interp.load(str(tmp_path))
    line = str(e.value)
    assert "\n" not in line and "Gemma3nForConditionalGeneration" in line and "timm" in line and "torchvision" in line
    assert "install timm and torchvision" in line and torch.__version__.split("+")[0] in line
    assert "project_per_layer_inputs" in line and "lm.input" in line and "(4, B, T, D)" in line
    assert "inputs_embeds" in line and "docs/architectures.md" in line
