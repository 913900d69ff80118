"""Coverage-guided fuzzing of the image parsers with atheris (optional, not run by pytest).

    pip install atheris            # or: pip install -e '.[fuzz]'
    python -m tests.fuzz.atheris_images -atheris_runs=20000 [other libFuzzer flags]

The input bytes choose a seed image (seeds.py) and 1-4 mutations in the same
JSON vocabulary as the hypothesis fuzzers (mutations.py), so libFuzzer's
coverage feedback steers the mutations while every finding prints as a
ready-made corpus entry.  The rules are the hypothesis ones (target.py):
success or ImageError/BlockError, no hang, no huge allocation.  Known open
bugs (target.KNOWN_BUGS) are counted, not reported again.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # no stubs published
import trio

with atheris.instrument_imports():
    import nbdserve.block.chain
    import nbdserve.block.fvd
    import nbdserve.block.fvd.check
    import nbdserve.block.parallels
    import nbdserve.block.parallels.check
    import nbdserve.block.qcow2
    import nbdserve.block.qcow2.check  # noqa: F401  (instrumented for coverage)

from tests.fuzz.mutations import Mutation, apply, interesting_values
from tests.fuzz.seeds import SEEDS, Seed, build_seed, formats_available
from tests.fuzz.target import FuzzFailure, exercise, exercise_check

_OPS = ["field", "entry", "flip", "byte", "truncate"]


def _mutation(fdp: atheris.FuzzedDataProvider, seed: Seed) -> Mutation | None:
    op = fdp.PickValueInList(_OPS)
    lay = seed.layout
    if op == "field" and lay.fields:
        name = fdp.PickValueInList(sorted(lay.fields))
        f = lay.fields[name]
        return {"op": "field", "name": name, "value": _value(fdp, f.size, f.read(seed.data), seed)}
    if op == "entry" and lay.tables:
        name = fdp.PickValueInList(sorted(lay.tables))
        t = lay.tables[name]
        index = fdp.ConsumeIntInRange(0, t.count - 1)
        original = t.entry(index).read(seed.data)
        value = _value(fdp, t.entry_size, original, seed)
        return {"op": "entry", "table": name, "index": index, "value": value}
    if op in ("flip", "byte") and lay.regions:
        name = fdp.PickValueInList(sorted(lay.regions))
        offset = fdp.ConsumeIntInRange(0, max(0, lay.regions[name][1] - 1))
        if op == "flip":
            return {
                "op": "flip",
                "region": name,
                "offset": offset,
                "bit": fdp.ConsumeIntInRange(0, 7),
            }
        return {"op": "byte", "region": name, "offset": offset, "value": fdp.ConsumeInt(1) & 0xFF}
    if op == "truncate":
        return {"op": "truncate", "length": fdp.ConsumeIntInRange(0, max(0, len(seed.data) - 1))}
    return None


def _value(fdp: atheris.FuzzedDataProvider, width: int, original: int, seed: Seed) -> int:
    if fdp.ConsumeBool():
        return int(fdp.PickValueInList(interesting_values(width, original, len(seed.data))))
    return int(fdp.ConsumeIntInRange(0, (1 << (8 * width)) - 1))


class Harness:
    def __init__(self, root: Path) -> None:
        have = formats_available()
        self.seeds = [build_seed(root, n) for n, (fmt, _) in SEEDS.items() if fmt in have]

    def __call__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        seed = self.seeds[fdp.ConsumeIntInRange(0, len(self.seeds) - 1)]
        muts = [m for _ in range(fdp.ConsumeIntInRange(1, 4)) if (m := _mutation(fdp, seed))]
        check = fdp.PickValueInList([None, None, None, "none", "leaks", "all"])
        read_only = fdp.ConsumeBool()
        write = not read_only and fdp.ConsumeBool()
        entry: dict[str, object] = {"seed": seed.name, "fmt": seed.fmt, "mutations": muts}
        if check is None:
            entry.update(read_only=read_only, write=write, probe=False)
        else:
            entry["check"] = check
        seed.target.write_bytes(apply(seed, muts))
        try:
            if check is None:
                trio.run(self._open, seed, read_only, write)
            else:
                trio.run(self._check, seed, None if check == "none" else check)
        except FuzzFailure:
            print("corpus entry:", json.dumps(entry, sort_keys=True), file=sys.stderr)
            raise

    @staticmethod
    async def _open(seed: Seed, read_only: bool, write: bool) -> None:
        await exercise(
            seed.target, fmt=seed.fmt, read_only=read_only, write=write, allow_known=True
        )

    @staticmethod
    async def _check(seed: Seed, repair: str | None) -> None:
        await exercise_check(seed.target, seed.fmt, repair, allow_known=True)


def main() -> None:
    logging.disable(logging.WARNING)  # drivers warn about every dirty/corrupt image
    with tempfile.TemporaryDirectory(prefix="nbdserve-atheris-") as root:
        harness = Harness(Path(root))
        atheris.Setup(sys.argv, harness)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
