"""A bench result as people and docs read it: the markdown table, the chart, and one result row per timing
(docs/results)."""

from __future__ import annotations

from pathlib import Path

from evsam_export.bench.timing import PLAIN_DECODER, BenchResult


def table(result: BenchResult) -> str:
    baseline = {t.workload: t.median_ms for t in result.timings if t.subject == "pytorch-eager"}
    rows = [f"{'subject':<24} {'component':<8} {'workload':<14} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'items/s':>8} "
            f"{'vs torch':>8} {'load s':>7} {'peak MB':>8}"]
    for t in result.timings:
        speedup = f"{baseline[t.workload] / t.median_ms:.2f}x" if t.workload in baseline else "-"
        rows.append(f"{t.subject:<24} {t.component:<8} {t.workload:<14} {t.median_ms:>10.1f} {t.p90_ms:>8.1f} {t.min_ms:>8.1f} "
                    f"{t.per_second:>8.2f} {speedup:>8} {t.load_s:>7.2f} {t.peak_rss_mb or '-':>8}")
    notes = {t.subject: t.note for t in result.timings if t.note}
    rows += [f"{subject}: {note}" for subject, note in notes.items()]
    return "\n".join(rows)


def chart(result: BenchResult, path: Path) -> Path:
    """Horizontal bar chart of median latency per subject and workload (Pillow only)."""
    from PIL import Image, ImageDraw

    rows = result.timings
    width, bar_h, left = 900, 22, 330
    height = 40 + bar_h * len(rows) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (10, 10),
        f"EfficientViT-SAM-{result.variant}: median latency (ms), {result.threads} threads, {result.machine.get('cpu', '')}",
        fill="black",
    )
    longest = max((t.median_ms for t in rows), default=1.0)
    colors = {"encoder": (66, 120, 200), "decoder": (230, 140, 40)}
    for index, t in enumerate(rows):
        y = 40 + index * bar_h
        draw.text((10, y + 4), f"{t.subject} / {t.workload}", fill="black")
        length = int((width - left - 80) * t.median_ms / longest)
        draw.rectangle([left, y + 3, left + max(length, 1), y + bar_h - 3], fill=colors.get(t.component, (120, 120, 120)))
        draw.text((left + length + 6, y + 4), f"{t.median_ms:.1f}", fill="black")
    image.save(path)
    return path


def weights_label(spec: str) -> str:
    """A short name of the weights for a result row: synthetic:SEED, realistic, or the checkpoint's file name."""
    if not spec or spec.startswith("synthetic:"):
        return spec or "synthetic:0"
    name = Path(spec).name
    return "realistic" if spec == "realistic" or "_realistic" in name else name


def result_rows(result: BenchResult) -> list[tuple[str, str, dict]]:
    """(table, key, values) for each timing, as docs/benchmarks.md's tables take them: encoder timings in
    `encoder-latency`, decoder and prompt timings in `prompts`. The key names variant, weights, subject and
    workload, so re-measuring replaces the earlier row of the same thing."""
    weights = weights_label(result.weights)
    baseline = {t.workload: t.median_ms for t in result.timings if t.subject == "pytorch-eager"}
    plain = {t.workload: t.median_ms for t in result.timings if t.subject in ("plain-onnx", PLAIN_DECODER)}
    rows = []
    for t in result.timings:
        table = "encoder-latency" if t.component == "encoder" else "prompts"
        values = {"variant": result.variant, "weights": weights,
                  ("artifact" if table == "encoder-latency" else "subject"): t.subject,
                  "workload": t.workload, "threads": result.threads, "median_ms": round(t.median_ms, 1),
                  "p90_ms": round(t.p90_ms, 1)}
        if t.workload in baseline:
            values["vs_pytorch"] = f"{baseline[t.workload] / t.median_ms:.2f}x"
        if t.workload in plain:
            values["vs_plain_export" if table == "encoder-latency" else "vs_plain_graph"] = f"{plain[t.workload] / t.median_ms:.2f}x"
        if t.peak_rss_mb is not None:
            values["peak_rss_mb"] = t.peak_rss_mb
        rows.append((table, f"{result.variant}-{weights}-{t.subject}-{t.workload}", values))
    return rows
