"""The parity gate a build step runs on its candidates, handed to the step through StepContext.gating.

The step contract (evsam_export.steps) sits below the parity package, so a precision or target step never
imports parity: the pipeline (or a test) builds the context with `gating=ParityGate()`, and `ctx.gate(...)`,
`ctx.suite_reference(...)` and `ctx.load_suite(...)` come here.
"""

from __future__ import annotations

from evsam_export import contract
from evsam_export.manifest import verify_artifact_file
from evsam_export.progress import Reporter


class ParityGate:
    """Parity reports of candidate artifacts in memory, against the PyTorch reference of the context's suite
    (computed once per suite and weights, kept in `ctx.references`)."""

    def report(self, ctx, candidates, only_candidates: bool = False):
        """Parity report of `candidates` (plus the fp32 ONNX artifacts they pair with) on `ctx.suite`.

        Runners on the files in `ctx.folder`, compared with the suite's reference held in `ctx.references`;
        nothing is written, and the folder's manifest.json is left as it was. `only_candidates` (a build gate):
        only the candidates' stages, stopping at a failed one (parity.compare's `subjects`)."""
        from evsam_export.parity.compare import compare, open_runners
        from evsam_export.parity.task import measure_task

        # The split decoder's halves compute the fp32 decoder's values (checked at export): gating a candidate
        # with them too would repeat the decoder and end-to-end stages of every fallback round.
        chosen = [a for a in ctx.manifest.artifacts
                  if a.target == "onnx" and a.precision == "fp32" and a.component not in contract.SPLIT_DECODER]
        for candidate in candidates:  # a candidate replaces an artifact of its id, as Manifest.add does
            chosen = [a for a in chosen if a.id != candidate.id] + [candidate]
        for artifact in chosen:
            verify_artifact_file(ctx.folder, artifact)
        quiet = Reporter(quiet=True)
        held = self.suite_reference(ctx, quiet)
        with open_runners(ctx.folder, chosen, ctx.threads) as (runners, unavailable):
            report = compare(runners, held.cases, held.reference, held.suite, ctx.manifest.variant, unavailable, quiet,
                             subjects={c.id for c in candidates} if only_candidates else None)
            measure_task(report, runners, ctx.manifest, held.suite, held.reference.task, quiet)
        report.folder = ctx.folder
        return report

    def suite_reference(self, ctx, reporter: Reporter):
        """The suite's cases and PyTorch reference, computed on first use and kept in `ctx.references`."""
        from evsam_export.parity.reference import SuiteReference, build_cases, pytorch_reference
        from evsam_export.parity.suites import load_suite
        from evsam_export.parity.task import task_reference

        key = (ctx.suite, ctx.manifest.weights.get("sha256"))
        if key not in ctx.references:
            suite = load_suite(ctx.suite, ctx.ground_truth)
            cases = build_cases(suite, ctx.manifest.encoder_size, reporter)
            reference = pytorch_reference(ctx.manifest, ctx.folder, cases, reporter,
                                          with_model=task_reference(ctx.manifest, suite, reporter))
            ctx.references[key] = SuiteReference(suite, cases, reference)
        return ctx.references[key]

    def load_suite(self, name: str):
        from evsam_export.parity.suites import load_suite

        return load_suite(name)
