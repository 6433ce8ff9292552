"""The build-step contract: what every precision and target step receives and returns (`step.StepContext`,
artifact naming), the settings base (`settings`), and the gated fallback loop a precision step builds with
(`fallback`). It sits below the parity package: the gate reaches a step as `StepContext.gating`."""
