"""Every shared constant and default is defined once: in ``services/constants.py`` (audio
geometry, session defaults), ``services/wire/settings.py`` (the settings dataclass) and
``services/transport/keys.py`` (Redis key names). Written out anywhere else, they drift."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from services import constants
from services.wire.settings import SessionSettings, StreamSettings

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for d in ("services", "encoder_service", "lm_service", "benchmarks")
    for p in (ROOT / d).rglob("*.py")
    if "pb" not in p.relative_to(ROOT).parts[:2]  # generated stubs
)
CONSTANTS = ROOT / "services" / "constants.py"
KEYS = ROOT / "services" / "transport" / "keys.py"
# Values that only constants.py may write as literals (numbers in code, not in comments/docstrings).
NUMBERS = {"16000", "16_000", "10.08", "3200", "1008"}
STRINGS = {constants.DEFAULT_PROMPT}


def _tokens(path: Path) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))


def _docstring_lines(path: Path) -> set[int]:
    """Line numbers of docstrings (a prompt quoted in prose is not a second definition)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def test_the_sources_are_scanned() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"services/constants.py", "lm_service/worker.py", "encoder_service/server.py"} <= names
    assert not any(n.startswith("services/pb/") for n in names)


def test_audio_constants_and_the_default_prompt_are_written_once() -> None:
    found: list[str] = []
    for path in SOURCES:
        if path == CONSTANTS:
            continue
        docs = _docstring_lines(path)
        for tok in _tokens(path):
            if tok.type == tokenize.NUMBER and tok.string in NUMBERS:
                found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string}")
            if tok.type == tokenize.STRING and tok.start[0] not in docs:
                if any(s in tok.string for s in STRINGS):
                    found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string}")
    assert not found, "import these from services.constants instead:\n" + "\n".join(found)


def test_constant_names_are_assigned_only_in_constants() -> None:
    names = {n for n in vars(constants) if n.isupper()}
    found = []
    for path in SOURCES:
        if path == CONSTANTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in targets:
                if isinstance(t, ast.Name) and t.id in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {t.id}")
    assert not found, "defined again outside services/constants.py:\n" + "\n".join(found)


def test_redis_keys_are_built_only_in_keys_py() -> None:
    found = []
    for path in SOURCES:
        if path == KEYS:
            continue
        docs = _docstring_lines(path)
        for tok in _tokens(path):
            if tok.start[0] in docs:
                continue
            if tok.type == tokenize.STRING and ("mdl:" in tok.string or "{PREFIX}" in tok.string):
                found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string}")
        if "import PREFIX" in path.read_text() or "keys.PREFIX" in path.read_text():
            found.append(f"{path.relative_to(ROOT)}: uses PREFIX")
    assert not found, "build Redis keys in services/transport/keys.py:\n" + "\n".join(found)


def test_session_defaults_come_from_constants() -> None:
    s = StreamSettings()
    assert s.sample_rate == constants.SAMPLE_RATE and s.encoding == constants.LINEAR16
    d = SessionSettings()
    assert (d.prompt, d.window_seconds, d.hop_seconds, d.max_new_tokens) == (
        constants.DEFAULT_PROMPT,
        constants.DEFAULT_WINDOW_SECONDS,
        constants.DEFAULT_HOP_SECONDS,
        constants.DEFAULT_MAX_NEW_TOKENS,
    )


def test_the_page_takes_its_defaults_from_the_server() -> None:
    static = ROOT / "services" / "gateway" / "static"
    for page in static.glob("*.*"):
        assert constants.DEFAULT_PROMPT not in page.read_text(), (
            f"{page.name} writes the default prompt itself"
        )


def test_derived_constants() -> None:
    assert constants.TOKENS_PER_SECOND == 5.0
    assert constants.ENCODER_WINDOW_SECONDS == 10.08
    assert constants.SAMPLES_PER_TOKEN == 3200
    assert constants.ENCODER_WINDOW_PATCHES == 252
