"""Errors a user can act on: each carries an exit code and a one-line hint saying how to fix it.

The CLI prints `error: <message> (<hint>)` and exits with `exit_code`; tracebacks only with --debug.
"""

from __future__ import annotations


class EvsamError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class UsageError(EvsamError):
    """Bad command-line input: unknown variant, bad prompt, bad option value."""

    exit_code = 2


class CheckpointError(EvsamError):
    """Missing, corrupt, truncated or mismatched checkpoint."""

    exit_code = 3


class OutputError(EvsamError):
    """Output folder not writable, or not empty without --force."""

    exit_code = 4


class RecipeError(EvsamError):
    """Recipe file missing or invalid (unknown key, wrong type, unknown target)."""

    exit_code = 5


class SettingValueError(RecipeError):
    """A setting has a value of the right type that the step cannot use; `field` names it."""

    def __init__(self, field: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{field}: {message}", hint=hint)
        self.field = field


class ArtifactError(EvsamError):
    """Artifact folder without a (valid) manifest, or a file changed since export."""

    exit_code = 6


class RuntimeUnavailable(EvsamError):
    """An optional runtime (OpenVINO, TensorRT, a GPU) is not installed or not usable here."""

    exit_code = 7


class ExportError(EvsamError):
    """Tracing, simplification or a graph check failed."""

    exit_code = 8


class ParityFailure(EvsamError):
    """At least one parity gate failed; the report says which."""

    exit_code = 10


class NothingGained(EvsamError):
    """Built and gated, but a lower-precision step gained nothing (no layer left in the lower precision, or less
    than its min_speedup over the fp32 parent), so its fp32 parent ships: a CI job can tell this from "built
    and faster" (exit 0). The release gate failing (10) takes precedence."""

    exit_code = 11
