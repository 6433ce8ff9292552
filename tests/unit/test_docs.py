"""The documentation against the code: generated pages current, commands and options real, section references
and repository paths resolving, result rows complete, the README a front door, no development history."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from evsam_export import docs_gen

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Hand-written pages and the README; docs/benchmarks.md's commands are records of what ran, checked as result rows.
HAND_WRITTEN = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]
ALL_DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_generated_pages_are_current():
    stale = docs_gen.stale_pages(ROOT)
    assert not stale, f"stale: {', '.join(map(str, stale))}; run `python -m evsam_export.docs_gen`"


def test_every_result_row_says_when_where_and_how():
    rows = [p for p in (ROOT / docs_gen.RESULTS_DIR).glob("*/*.json") if p.name != docs_gen.TABLE_META]
    assert rows
    for path in rows:
        row = json.loads(path.read_text())
        missing = [f for f in docs_gen.ROW_FIELDS if f not in row]
        assert not missing, f"{_rel(path)} lacks {missing}"
        assert row["table"] == path.parent.name and isinstance(row["values"], dict) and row["values"], _rel(path)
        assert row["command"] and row["date"] and row["cpu"], _rel(path)


def test_benchmarks_page_renders_every_row(tmp_path):
    """A row added under docs/results/ shows up on the page (so a stale page fails the test above)."""
    table = tmp_path / docs_gen.RESULTS_DIR / "demo"
    table.mkdir(parents=True)
    (table / docs_gen.TABLE_META).write_text(json.dumps({"title": "Demo table", "order": 1}))
    from evsam_export.measurements import record_measurement

    record_measurement(tmp_path / docs_gen.RESULTS_DIR, "demo", "l0-x", {"median_ms": 12.5}, command="evsam-export bench DIR")
    page = docs_gen.benchmarks_page(tmp_path)
    assert "## Demo table" in page and "| 12.5 |" in page and "`evsam-export bench DIR`" in page


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 400]
    assert not long, f"README lines over 400 characters: {long}"


# ------------------------------------------------------------------------------------ commands and options

_CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.S)
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_|.]*$")


def _command_snippets(text: str):
    """Each `evsam-export ...` (or `python -m evsam_export.cli ...`) invocation in code blocks and code spans."""
    for match in _CODE.finditer(text):
        code = match.group(1) if match.group(1) is not None else match.group(2)
        code = code.replace("\\\n", " ")
        for line in code.splitlines():
            for part in re.split(r"&&|\|\||;|\$\(|\)", line):
                found = re.search(r"(?:\bevsam-export|python -m evsam_export\.cli)\s+(.*)", part)
                if found:
                    yield found.group(1).split("#")[0].strip()


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def _check_invocation(rest: str, commands: dict[str, set[str]]) -> str | None:
    tokens = [t.strip("[](),") for t in _tokens(rest)]
    tokens = [t for t in tokens if t and t not in ("...", "|", "\u2026")]
    if not tokens or tokens[0].startswith("-") or _PLACEHOLDER.match(tokens[0]):
        return None  # root options (--version), or a placeholder such as COMMAND
    name = " ".join(tokens[:2]) if " ".join(tokens[:2]) in commands else tokens[0]
    if name not in commands:
        return f"unknown command {name!r}"
    options = commands[name]
    for token in tokens[len(name.split()):]:
        for option in token.split("|"):
            if re.match(r"^--?[A-Za-z][\w-]*", option):
                flag = option.split("=", 1)[0]
                if flag not in options:
                    return f"{name}: unknown option {flag}"
    return None


def test_every_command_line_names_existing_commands_and_options():
    commands = docs_gen.cli_commands()
    problems = []
    for path in HAND_WRITTEN:
        for snippet in _command_snippets(path.read_text()):
            problem = _check_invocation(snippet, commands)
            if problem:
                problems.append(f"{_rel(path)}: `evsam-export {snippet}`: {problem}")
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_a_bad_option():
    commands = docs_gen.cli_commands()
    assert _check_invocation("validate out/l0 --no-such-option", commands)
    assert _check_invocation("frobnicate DIR", commands)
    assert _check_invocation("cache prune --older-than 30", commands) is None
    assert _check_invocation("evaluate DIR --max-drop box=1,point=2 [--shard K/N]", commands) is None


# ------------------------------------------------------------------------------------ references and paths

_SECTION_REF = re.compile(r"((?:docs/)[\w./-]+\.md)[,:]?\s+\(?\"([^\"\n]+)\"")
_REPO_PATH = re.compile(r"(?<![\w/.~$<-])((?:evsam_export|scripts|tests|docs|recipes|validators|\.ci)/[\w./-]*[\w])")


def _headings(path: Path) -> list[str]:
    return [re.sub(r"[`*]", "", line.lstrip("#")).strip().lower()
            for line in path.read_text().splitlines() if line.startswith("#")]


def _reference_sources() -> list[Path]:
    code = [p for p in (ROOT / "evsam_export").rglob("*") if p.suffix in (".py", ".toml")]
    return [*ALL_DOCS, *code, *(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]


def test_every_section_reference_resolves_to_a_heading():
    problems = []
    for source in _reference_sources():
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", source.read_text())  # references wrap across (comment) lines
        for target, section in _SECTION_REF.findall(text):
            path = ROOT / target
            if not path.is_file():
                problems.append(f"{_rel(source)}: {target} does not exist")
                continue
            wanted = re.sub(r"[`*]", "", section).strip().lower()
            if not any(h == wanted or h.startswith(wanted) for h in _headings(path)):
                problems.append(f'{_rel(source)}: {target} has no heading "{section}"')
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_repository_path_named_in_the_docs_exists():
    problems = []
    for path in ALL_DOCS:
        for name in _REPO_PATH.findall(path.read_text()):
            name = name.rstrip(".")
            if not (ROOT / name).exists():
                problems.append(f"{_rel(path)}: {name}")
    assert not problems, "\n".join(sorted(set(problems)))


_MODULE = re.compile(r"(?<![\w/.])evsam_export(?:\.[A-Za-z_]\w*)+")


def _module_problem(dotted: str) -> str | None:
    """None when `evsam_export.a.b.name` names a package, a module and names defined in it (read as text)."""
    path = ROOT / "evsam_export"
    parts = dotted.split(".")[1:]
    while parts and ((path / parts[0]).is_dir() or (path / f"{parts[0]}.py").is_file()):
        path = path / parts[0] if (path / parts[0]).is_dir() else path / f"{parts[0]}.py"
        parts = parts[1:]
    if not parts:
        return None
    source = path / "__init__.py" if path.is_dir() else path
    text = source.read_text() if source.is_file() else ""
    if not re.search(rf"\b{re.escape(parts[0])}\b", text):
        return f"{dotted}: {parts[0]} is not in {source.relative_to(ROOT)}"
    return None


def test_every_module_named_in_the_docs_exists():
    problems = [f"{_rel(path)}: {problem}" for path in ALL_DOCS for dotted in _MODULE.findall(path.read_text())
                if (problem := _module_problem(dotted.rstrip(".")))]
    assert not problems, "\n".join(sorted(set(problems)))


# ------------------------------------------------------------------------------------ no development history

# How numbers moved belongs in git history, not in the repository. A fallback *round* of the INT8 gate is a product
# concept and is not matched; what is matched are the markers of a development log.
HISTORY = re.compile(
    r"\b(?:sessions?[ -]\d+|issues? \d+|\(issue|before this (?:work|change|branch)|(?:this|previous|earlier|next) session"
    r"|in this branch|\(was [\d.,]+|was [\d.,]+ ?(?:ms|s|x|dB|GB|GiB|MB|MiB)\b)",
    re.I,
)


def _history_sources() -> list[Path]:
    sources = [README, ROOT / "pyproject.toml", ROOT / ".ci" / "run", *(ROOT / "docs").rglob("*.md"),
               *(ROOT / "docs").rglob("*.json"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
    sources += [p for p in (ROOT / "evsam_export").rglob("*") if p.suffix in (".py", ".toml", ".md", ".js", ".html")]
    return [p for p in sources if p.is_file() and p.resolve() != Path(__file__).resolve()]


def test_no_development_history_markers():
    hits = [f"{_rel(path)}:{number}: {line.strip()[:120]}"
            for path in _history_sources()
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if HISTORY.search(line)]
    assert not hits, f"{len(hits)} lines carry development history:\n" + "\n".join(hits)


@pytest.mark.parametrize("line, marked", [
    ("## Session 9: prompt speed", True), ("measured (issue 20)", True), ("0.34x (292 vs 99 ms, was 122 ms)", True),
    ("the build gate passed in round 3", False), ("a fallback round of the INT8 gate", False),
])
def test_the_history_pattern(line, marked):
    assert bool(HISTORY.search(line)) is marked


def test_recipe_row_says_which_auto_artifacts_were_not_gated_through(tmp_path):
    """An auto recipe keeps every candidate's artifacts; its results row marks those of a candidate that failed
    (or gained nothing), so the row never reads as if a refused lower-precision artifact were the outcome."""
    import json
    import time
    from types import SimpleNamespace

    from evsam_export.cli.run_cmd import _record_build

    lowered = {"precision": "bf16", "text": "69 of 69 Conv bf16"}
    artifacts = [SimpleNamespace(id="encoder.openvino.bf16", facts={"lowered": lowered}),
                 SimpleNamespace(id="encoder.ort.int8", facts={"lowered": {**lowered, "text": "64 of 69 Conv INT8"}}),
                 SimpleNamespace(id="encoder.ort.fp32", facts={})]
    history = [{"recipe": "cpu-auto", "candidates": [
        {"recipe": "cpu-openvino-bf16", "status": "failed", "artifacts": ["encoder.openvino.bf16"], "seconds": 26.0},
        {"recipe": "cpu-ort-int8", "status": "passed", "artifacts": ["encoder.ort.int8"], "seconds": 150.0}]}]
    manifest = SimpleNamespace(artifacts=artifacts, history=history)
    _record_build(tmp_path, "cpu-auto", "l0", None, time.perf_counter(), manifest, 0)
    row = json.loads((tmp_path / "recipes" / "l0-cpu-auto.json").read_text())["values"]
    assert row["lower_precision_artifact"] == ("encoder.openvino.bf16 (69 of 69 Conv bf16) [candidate failed]; "
                                               "encoder.ort.int8 (64 of 69 Conv INT8)")
    assert row["steps"] == "cpu-openvino-bf16 failed (26 s), cpu-ort-int8 passed (150 s)"
