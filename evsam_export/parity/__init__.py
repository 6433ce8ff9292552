"""Parity between an exported artifact and the PyTorch reference: pure-numpy metrics (`metrics`), the
suites of images, prompts and per-precision tolerances read from `validators/*.toml` (`suites`), the
cases and PyTorch reference outputs (`reference`), the in-memory comparison of runners against them
(`compare`), the gate of an artifact folder (`validate`) and its report files (`report`)."""
