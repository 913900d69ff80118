"""Replay the fuzz corpus (tests/fuzz/corpus/<fmt>/*.json) in the default run.

Each entry is a seed name plus a mutation list (corpus.py).  The replay
applies the same allowed-outcome rules as the fuzzers; entries that carry an
``expect`` must also give that outcome (the regressions for fixed findings).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fuzz import corpus
from tests.fuzz.mutations import apply
from tests.fuzz.seeds import SEEDS, build_seed, formats_available
from tests.fuzz.target import exercise, exercise_check

ENTRIES = corpus.entries()


def _params() -> list[object]:
    """Entries that reproduce a known, unfixed bug outside this area carry ``xfail``."""
    out: list[object] = []
    for name, entry in ENTRIES:
        marks = [pytest.mark.xfail(strict=True, reason=entry["xfail"])] if "xfail" in entry else []
        out.append(pytest.param(name, entry, id=name, marks=marks))
    return out


@pytest.fixture(scope="module")
def corpus_seed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeds the corpus names, built once (outside trio, see seeds.py)."""
    root = tmp_path_factory.mktemp("corpus-seeds")
    for name in sorted({e["seed"] for _, e in ENTRIES}):
        if SEEDS[name][0] in formats_available():
            build_seed(root, name)
    return root


@pytest.mark.parametrize(("name", "entry"), _params())
async def test_corpus_entry(corpus_seed_root: Path, name: str, entry: corpus.Entry) -> None:
    fmt = SEEDS[entry["seed"]][0]
    if fmt not in formats_available():
        pytest.skip(f"{fmt} seeds need qemu-img and qemu-io")
    seed = build_seed(corpus_seed_root, entry["seed"])
    seed.target.write_bytes(apply(seed, entry["mutations"]))
    check = entry.get("check")
    if check is not None:
        outcome = await exercise_check(seed.target, fmt, None if check == "none" else check)
    else:
        outcome = await exercise(
            seed.target,
            fmt=None if entry.get("probe") else fmt,
            read_only=entry.get("read_only", True),
            write=entry.get("write", False),
        )
    if "expect" in entry:
        assert outcome.kind == entry["expect"], (name, outcome)
    if "expect_message" in entry:
        assert re.search(entry["expect_message"], outcome.message), (name, outcome)


def test_corpus_is_not_empty() -> None:
    formats = {name.split("/")[0] for name, _ in ENTRIES}
    assert formats >= {"qcow2", "parallels", "fvd"}, formats
