"""Parity between an exported artifact and the PyTorch reference: pure-numpy metrics (`metrics`) and the
suites of images, prompts and per-precision tolerances read from `validators/*.toml` (`suites`)."""
