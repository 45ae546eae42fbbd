"""Every code block of the README and of the guide it points to (docs/guide.md) runs as written.

* ```python blocks run in order in one fresh interpreter (cwd: a temporary folder; the organism
  and tiny models only, nothing downloaded).
* ```bash blocks: every `spatialbias` command is run with `--dry-run` (it must parse its options
  and build its plan; it runs no model, so a 7B command needs no weights here), every `make`
  target must exist (`make -n TARGET` succeeds).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "guide.md"]
README = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def test_the_readme_is_one_screen_that_points_onwards():
    """What the toolkit does, the two commands, one picture and where to go next; the rest lives in
    docs/ (its code blocks are tested here too), and every link leads somewhere."""
    text = DOCS[0].read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 60
    assert "make demo" in text and "make test" in text
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pictures) == 1 and (ROOT / pictures[0]).is_file()
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (doc.parent / target).exists(), (doc.name, target)


def test_the_readme_has_code_blocks():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") >= 4 and langs.count("bash") >= 3


def test_python_blocks_run_as_written(tmp_path):
    code = "\n\n".join(src for lang, src in BLOCKS if lang == "python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPATIALBIAS_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.Size([9, 128]) torch.Size([9, 128])" in r.stdout  # what the README says the trace gives


def _commands():
    for lang, src in BLOCKS:
        if lang != "bash":
            continue
        for line in src.replace("\\\n", " ").splitlines():  # a line ending in \ continues
            cmd = line.split("#", 1)[0].strip()
            if cmd:
                yield cmd


@pytest.mark.parametrize("cmd", list(_commands()))
def test_bash_commands_parse(cmd, tmp_path):
    args = shlex.split(cmd)
    if args[0] == "make":
        extra = [a for a in args[1:] if "=" in a]
        targets = [a for a in args[1:] if "=" not in a]
        r = subprocess.run(["make", "-n", *targets, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return
    assert args[0].endswith("spatialbias"), cmd
    args = [str(Path(sys.executable).parent / "spatialbias")] + [
        str(tmp_path / a) if a.startswith("out/") or a.startswith("/path/") else a for a in args[1:]]
    if "--from" in args:  # `report --from DIR` needs a run folder: the sweep command above writes one
        return
    if "--probe" in args:  # a probe given by path: use a real one
        from probes.build import shapes_probe
        i = args.index("--probe")
        args[i + 1] = str(shapes_probe(tmp_path / "probe", n_items=1, seed=0, progress=False).parent)
    if "--model" in args and args[args.index("--model") + 1].startswith(str(tmp_path)):
        from interp import tiny
        tiny.save(*tiny.build_llava(), args[args.index("--model") + 1])
    r = subprocess.run(args + ["--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-1500:]
    assert "conditions," in r.stdout and "pending" in r.stdout
