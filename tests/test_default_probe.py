"""The report's default probe fits the model whatever the checkpoint folder's history (a user's
own small checkpoint, a zoo organism copied without its training record, every architecture),
and a failure that every condition would share stops the run at once with one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analyses.cli import app
from interp import tiny
from interp.load import probe_canvas
from probes.build import shapes_probe

runner = CliRunner()
ZOO = Path(__file__).parent.parent / "analyses" / "organisms" / "checkpoints"

# side in px each builder's processor takes as drawn, worked out by hand from its files:
# CLIP/SigLIP towers: vision_config.image_size; Qwen: the multiple of 3 x patch 8 x merge 2 = 48
# nearest 336 whose area lies in the processor's 16²..64² pixels; InternVL: 3 × its 48 px tile (the largest
# k×k tiling of max_patches 12 with k a multiple of 3: one tile per cell); Gemma4: ⌊√(70·2²) / 2⌋·2 = 16 patches
# of 4 px, the side its aspect-preserving resize maps every square to; Gemma3n: its SigLIP processor's fixed
# size (48 px: the stand-in tower's 6×6 soft tokens)
EXPECTED = {"llava": 32, "llava_next": 32, "qwen2vl": 48, "qwen25vl": 48, "gemma3": 32, "llava_onevision": 32, "qwen3vl": 48,
            "internvl": 144, "qwen3vl_moe": 48, "gemma4": 64, "qwen35": 48, "gemma3n": 48, "gemma4_small": 64}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_default_probe_of_every_architecture_fits_its_processor(arch, tmp_path):
    model, proc = getattr(tiny, f"build_{arch}")()
    folder = tiny.save(model, proc, tmp_path / arch)
    side = probe_canvas(folder)
    assert side == EXPECTED[arch]
    probe = shapes_probe(tmp_path / "probe", n_items=1, cell_px=side // 3, progress=False).parent
    import interp
    from analyses.evaluate import load_image
    from probes.format import find_probe, read_rows
    from helpers import stand_in_timm
    with stand_in_timm():  # a Gemma3n folder loads where timm is missing
        lvlm = interp.load(folder)
    rows = read_rows(find_probe(probe))
    images = [load_image(probe, r, r.image) for r in rows]
    assert len(images) == 9 and images[0].size == (side // 3 * 3,) * 2
    inputs = lvlm.inputs(images, [lvlm.prompt("what colour is the circle ?")] * 9)  # every placement's image
    logits = lvlm.run(inputs)  # the tiny vocabularies lack colour words: the forward is what must fit
    assert logits.shape[0] == 9 and logits.isfinite().all()
    cells = lvlm.image_map(inputs).cells(3, 3)
    covered = sorted(set(cells[0].tolist()) - {-1})  # the grid maps onto the image tokens
    assert covered == ([0, 2, 6, 8] if arch == "gemma3" else list(range(9)))  # tiny Gemma3: 2×2 soft tokens


def test_shipped_organisms_get_their_own_48_px_probe():
    assert probe_canvas("organism") == 48
    assert probe_canvas(ZOO / "mrope-seed0") == 48  # Qwen2-VL processor pinned to 48 x 48 pixels


def _copy_without_record(src: Path, dst: Path) -> Path:
    """A zoo organism as a user's fine-tune would be saved: the checkpoint without training.json."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("training.json"))
    assert not (dst / "training.json").exists()
    return dst


def test_report_on_an_organism_copied_without_its_training_record(tmp_path):
    """The newcomer's case: before, the folder got a 336 px probe (441 image tokens for a 48 px
    model) and every condition failed one after the other; now the probe is built at 48 px."""
    folder = _copy_without_record(ZOO / "planted-vision-seed0", tmp_path / "mine")
    out = tmp_path / "out"
    r = runner.invoke(app, ["report", "--model", str(folder), "--out", str(out), "--n-items", "6",
                            "--causal-items", "3", "--lambdas", "0.5", "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "probes" / "shapes" / "probe.json").read_text())["cell_px"] == 16
    run, = json.loads((out / "summary.json").read_text())["runs"]
    assert "organism" not in run  # no training record: diagnosed and shown as any user's checkpoint
    assert set(run["conditions"]) == {"baseline", "bapa", "agci:0.5"} and run["verdict"]
    assert r.output.splitlines()[0] == run["verdict"]  # the command prints the page's top first


def test_a_probe_the_model_cannot_take_stops_the_run_with_one_line(tmp_path):
    """A 336 px probe on the 48 px organism: every condition would fail the same way, so the run
    stops before the first one, with one line naming the model, the probe and the fix."""
    probe = shapes_probe(tmp_path / "p336", n_items=2, cell_px=112, progress=False).parent
    out = tmp_path / "out"
    r = runner.invoke(app, ["report", "--model", "organism", "--probe", str(probe), "--out", str(out),
                            "--no-progress", "--threads", "1"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model organism cannot take probe p336"), r.output
    assert "441 image tokens" in lines[0] and "nothing ran" in lines[0]
    assert not (out / "parts").exists() or not any((out / "parts").iterdir())


def test_every_command_takes_threads():
    """The README says every command takes --threads: each leaf command of the CLI has it."""
    import typer.main
    group = typer.main.get_command(app)

    def leaves(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if not subs:
            yield path, cmd
            return
        for name, sub in subs.items():
            yield from leaves(sub, (*path, name))
    found = list(leaves(group))
    assert len(found) >= 9
    missing = [" ".join(p) for p, cmd in found if not any("--threads" in o.opts for o in cmd.params
                                                          if hasattr(o, "opts"))]
    assert not missing, missing
