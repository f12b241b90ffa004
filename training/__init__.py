"""What train.py's loop runs: the five stages' objectives and measurements (stages.py), the
presets and the command line (config.py), the data they draw (datasets.py), the frozen-parts
cache (frozen_cache.py), ArcFace's margin head (arcface.py), the metrics and the pictures of the
held-out grids (metrics.py, pictures.py)."""
