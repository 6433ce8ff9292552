"""The pipeline: recipes, the step contract, the content-addressed step cache, the gated fallback loop
and the runner that drives export -> precision -> target -> validate."""
