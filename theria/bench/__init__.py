"""Benchmarks that print tables and write them under experiments/results/.

    python -m theria.bench <suite> [options]      suites: cpu, gpu, hvp, meta (see --help)

Each suite is a module here with `main(argv)`; `common` holds the timing, memory and table
helpers so every suite reports the same way (median of repeats, peak memory, the peer measured
in the same run, device/torch/triton versions).
"""
