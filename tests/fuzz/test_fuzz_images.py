"""Property fuzzing of every format's header and table parsers with mutated real images.

For each seed image (seeds.py) hypothesis draws a few mutations (mutations.py:
header fields and table entries set to boundary values, bit flips in metadata,
truncation), writes the mutated copy, and then

* opens it as the server would (with the format named or probed, read-only or
  read-write), reads and maps the whole disk, and writes a little when
  writable (``target.exercise``);
* in another test, runs the format's checker, with and without repair
  (``target.exercise_check``).

Only success or an ``ImageError``/``BlockError`` may come out; never another
exception, a hang, or a peak allocation above 64 MiB (target.py).

Examples per seed follow the hypothesis profile ("ci": 60 per test, shared
between the seeds of a format; HYPOTHESIS_PROFILE=soak: 5000); the ``slow``
variants run a fixed 400 examples per seed with random search.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import corpus
from tests.fuzz.mutations import apply, mutations
from tests.fuzz.seeds import SEEDS, Seed, build_seed, formats_available
from tests.fuzz.target import exercise, exercise_check

EXECUTIONS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
PEAK: Counter[str] = Counter()  # largest traced allocation peak per seed


@pytest.fixture(scope="session")
def seed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every available seed, built once (outside trio: FVD seeds run their own trio.run)."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    for name, (fmt, _) in SEEDS.items():
        if fmt in formats_available():
            build_seed(root, name)
    return root


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    for key in sorted(EXECUTIONS):
        print(f"fuzz executions {key}: {EXECUTIONS[key]}")
    print(f"fuzz executions total: {sum(EXECUTIONS.values())}")
    print(f"fuzz outcomes: {dict(OUTCOMES.most_common())}")
    if PEAK:
        seed, peak = PEAK.most_common(1)[0]
        print(f"fuzz largest traced allocation peak: {peak / 2**20:.1f} MiB ({seed})")


def _seed(seed_root: Path, name: str) -> Seed:
    fmt = SEEDS[name][0]
    if fmt not in formats_available():
        pytest.skip(f"{fmt} seeds need qemu-img and qemu-io")
    return build_seed(seed_root, name)


def _scaled(factor: float) -> settings:
    """The active profile's example count, scaled (one test per seed shares the budget)."""
    current = settings()
    return settings(current, max_examples=max(5, int(current.max_examples * factor)))


async def _fuzz_open(seed: Seed, data: st.DataObject, key: str) -> None:
    muts = data.draw(mutations(seed), label="mutations")
    read_only = data.draw(st.booleans(), label="read_only")
    write = not read_only and data.draw(st.booleans(), label="write")
    probe = data.draw(st.booleans(), label="probe")
    seed.target.write_bytes(apply(seed, muts))
    outcome = await exercise(
        seed.target,
        fmt=None if probe else seed.fmt,
        read_only=read_only,
        write=write,
        allow_known=True,
    )
    EXECUTIONS[key] += 1
    OUTCOMES[outcome.kind] += 1
    PEAK[seed.name] = max(PEAK[seed.name], outcome.peak)
    corpus.maybe_save(
        {
            "seed": seed.name,
            "fmt": seed.fmt,
            "mutations": muts,
            "read_only": read_only,
            "write": write,
            "probe": probe,
            "check": None,
        },
        outcome.signature(),
    )


async def _fuzz_check(seed: Seed, data: st.DataObject, key: str) -> None:
    muts = data.draw(mutations(seed), label="mutations")
    repair = data.draw(st.sampled_from([None, "leaks", "all"]), label="repair")
    seed.target.write_bytes(apply(seed, muts))
    outcome = await exercise_check(seed.target, seed.fmt, repair, allow_known=True)
    EXECUTIONS[key] += 1
    OUTCOMES[f"check-{outcome.kind}"] += 1
    PEAK[seed.name] = max(PEAK[seed.name], outcome.peak)
    corpus.maybe_save(
        {"seed": seed.name, "fmt": seed.fmt, "mutations": muts, "check": repair or "none"},
        "check-" + outcome.signature(),
    )


SEED_NAMES = list(SEEDS)


@pytest.mark.parametrize("name", SEED_NAMES)
@_scaled(1.0)
@given(data=st.data())
async def test_mutated_image_opens_reads_and_maps_safely(
    seed_root: Path, name: str, data: st.DataObject
) -> None:
    seed = _seed(seed_root, name)
    await _fuzz_open(seed, data, f"open {name}")


@pytest.mark.parametrize("name", SEED_NAMES)
@_scaled(0.5)
@given(data=st.data())
async def test_mutated_image_checks_safely(seed_root: Path, name: str, data: st.DataObject) -> None:
    seed = _seed(seed_root, name)
    await _fuzz_check(seed, data, f"check {name}")


_SOAK = settings(
    max_examples=400,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEED_NAMES)
@_SOAK
@given(data=st.data())
async def test_soak_mutated_image_opens_reads_and_maps_safely(
    seed_root: Path, name: str, data: st.DataObject
) -> None:
    seed = _seed(seed_root, name)
    await _fuzz_open(seed, data, f"soak open {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", SEED_NAMES)
@_SOAK
@given(data=st.data())
async def test_soak_mutated_image_checks_safely(
    seed_root: Path, name: str, data: st.DataObject
) -> None:
    seed = _seed(seed_root, name)
    await _fuzz_check(seed, data, f"soak check {name}")


@pytest.mark.parametrize("name", SEED_NAMES)
async def test_unmutated_seed_reads_back(seed_root: Path, name: str) -> None:
    """The harness can tell success from failure: every seed opens, reads and maps cleanly."""
    seed = _seed(seed_root, name)
    seed.target.write_bytes(seed.data)
    outcome = await exercise(seed.target, fmt=seed.fmt, read_only=True)
    assert outcome.kind == "ok", outcome
    assert seed.layout.tables, "the layout parser found no tables to mutate"
