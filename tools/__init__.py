"""Programs beside the method, run from the repository root: the evaluation against exact
ground truth (`python -m tools.evaluate`), the benchmarks (`python -m tools.bench`), the
--explain figure and --drive of sample.py (explain.py, drive.py) and the GPU run (gpu_run.sh)."""
