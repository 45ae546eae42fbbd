python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 250 python3 - <<'PY' 2>&1 | grep -v -E "Loading weights|Warning|warn"
import json, os, torch, interp
from analyses import bench
from interp import realshape, patching
res = {}
for name in ("llava15", "qwen25vl"):
    if name == "llava15":
        model, proc = realshape.llava_15_7b(dtype=torch.bfloat16, device="cuda"); size = (336, 336)
    else:
        model, proc = realshape.qwen25_vl_7b(dtype=torch.bfloat16, device="cuda"); size = (840, 840)
    m = interp.load(model, proc)
    clean, corrupt, correct, cands, targets = bench.placement_batch(m, 8, size)
    n = m.adapter.layer_count(model, "lm")
    ps = [patching.Patch(f"lm.blocks.{i}", g) for i in range(n) for g in ("image", "text", "last")]
    res[name] = {bs: bench.patching_speed(m, corrupt, clean, ps, correct, cands, targets, batch_size=bs) for bs in (16,)}
    print(name, json.dumps(res[name]))
    del model, m; torch.cuda.empty_cache()
open(os.environ["OUT"] + "/real_patching.json", "w").write(json.dumps(res, indent=1))
PY
