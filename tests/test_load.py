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


def test_gemma3n_without_timm_is_refused_with_the_fix(tmp_path):
    """A Gemma3n checkpoint needs timm (and so torchvision) for its vision tower; where timm is
    missing, one line naming the class and the fix, before anything loads (a config-only folder) —
    not a traceback from inside transformers. (With the tower present the class loads: the saved
    tiny Gemma3n goes through the rest of the path in tests/test_architectures.py.)"""
    import importlib.util
    import json

    import pytest

    from spatialbias.errors import SpatialBiasError
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3nForConditionalGeneration"],
                                                      "model_type": "gemma3n"}))
    with pytest.raises(SpatialBiasError) as e:
        interp.load(str(tmp_path))
    line = str(e.value)
    assert "\n" not in line and "Gemma3nForConditionalGeneration" in line and "timm" in line and "torchvision" in line
    assert "pip install timm torchvision" in line and "interp.load(model, processor)" in line
