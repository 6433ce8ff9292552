"""The pipeline: the export stage, recipes, the content-addressed step cache, and the runner that drives
export -> precision -> target -> validate (with auto, split lowering and the sensitivity analysis)."""
