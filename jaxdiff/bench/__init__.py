"""Benchmarks on exact ground truth: `problems` (the one registry of truth problems) and one table module per
benchmark (`solvers`, `gmm_ddim`, `amed`), each with `run(config, workdir)`, reached through
`python -m jaxdiff.main --mode=bench --config=configs/bench_NAME.py --workdir=DIR` (jaxdiff/modes/bench.py);
`speed` holds what the speed and memory scripts of benchmarks/ share."""
