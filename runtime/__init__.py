"""What the programs share and a reader of the method may skip: images in and out (images.py),
one-line command-line errors (cli.py), checkpoint files and the export (checkpoint.py), and the
run's safety: folder lock, signals, agreement across ranks, atomic checkpoints (guard.py)."""
