"""Which decoder an encoder is gated with end to end, and with which precision's tolerances: a leaf module,
so the evaluate protocol pairs artifacts the way the parity gate does without importing the gate."""

from __future__ import annotations

from evsam_export.manifest import Artifact


def looser_precision(first: str, second: str) -> str:
    """The precision whose tolerances an encoder -> decoder pairing is gated with (fp16 encoder + INT8 decoder:
    int8), by PRECISION_ORDER (exact first, loosest last)."""
    from evsam_export.runtime.choice import PRECISION_ORDER

    rank = {name: index for index, name in enumerate(PRECISION_ORDER)}
    return max(first, second, key=lambda name: rank.get(name, 0))


def pair_decoder(encoder: Artifact, decoders: list[Artifact]) -> Artifact | None:
    """The decoder an end-to-end deployment would use with this encoder: same target and precision, else
    same target, else the fp32 ONNX decoder."""
    for match in (
        lambda d: d.target == encoder.target and d.precision == encoder.precision,
        lambda d: d.target == encoder.target,
        lambda d: d.target == "onnx" and d.precision == "fp32",
    ):
        found = [d for d in decoders if match(d)]
        if found:
            return found[0]
    return decoders[0] if decoders else None


def end_to_end_pairings(encoders: list[Artifact], single: list[Artifact], split: list[Artifact]) -> list[tuple[Artifact, Artifact]]:
    """(encoder, decoder) of every end-to-end stage: each encoder with its pair_decoder among the single graphs,
    and with the split decoder exported beside that decoder (what our runtime runs in its place)."""
    pairings = []
    for encoder in encoders:
        decoder = pair_decoder(encoder, single)
        if decoder is None:
            decoder = pair_decoder(encoder, split)
            pairings += [(encoder, decoder)] if decoder is not None else []
            continue
        pairings.append((encoder, decoder))
        pairings += [(encoder, d) for d in split if d.parent == decoder.id]
    return pairings
