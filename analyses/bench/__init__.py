"""Every benchmark of the toolkit, in one package (why one home: docs/benchmarks.md).

``spatialbias bench`` runs :mod:`.ratios` (tracing overhead, batched vs looped patching,
attribution vs exact, scaling, the demo's phases) or, with ``--only``, the sections of :mod:`.scale`
(``memory`` — :mod:`.memory`, each measurement in a fresh process —, ``speed``, ``sharding``,
``screen``). What they share is in :mod:`.common`. One-off studies run as modules, each writing the
file its docs/benchmarks.md section cites:

    python -m analyses.bench.attribution_section --items 100 --out FILE.json   # attribution alone
    python -m analyses.bench.attribution_profile --items 40 --out FILE.md      # where its time goes
    python -m analyses.bench.real_scale --device cuda --out DIR                # wrapper vs HF at 7B
    python -m analyses.bench.profile_batching --device cuda --out DIR          # batching at 7B (GPU)
    OUT=DIR python -m analyses.bench.gpu_patching                              # patching at 7B (GPU)
    python -m analyses.bench.swap_map --model qwen3vl8b --threads 2 --out F.json  # swap map, one real shape
"""
