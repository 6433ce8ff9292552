"""Deterministic inputs for calibration and parity: seeded synthetic scenes with ground-truth masks,
scikit-image sample photos, and the prompt sets each parity suite asks for (`images`)."""
