"""What the method is drawn from when a user has no licensed assets: the built-in head in FLAME's
format (head.py, head_surface.py), the FLAME, OBJ and npz file readers and writers that load the
real model when a user has it (flame_files.py), and the synthetic portraits with exact ground
truth rendered from the head (synthetic.py)."""
