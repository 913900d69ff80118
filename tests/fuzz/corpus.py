"""The fuzz corpus: interesting inputs as JSON (seed name + mutation list), replayed by default.

An entry::

    {"seed": "qcow2-v3-512", "fmt": "qcow2",
     "mutations": [{"op": "field", "name": "l1_size", "value": 4294967295}],
     "read_only": true, "write": false, "probe": false, "check": null,
     "expect": "InvalidImageError",      # optional: outcome kind that must recur
     "note": "why this input is interesting"}

With ``FUZZ_SAVE_CORPUS=1`` the fuzzers add an entry whenever an input gives
an outcome (class and message shape) not yet in the corpus for that seed, up
to ``MAX_SAVED_PER_SEED`` per seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).parent / "corpus"
MAX_SAVED_PER_SEED = 12

Entry = dict[str, Any]


def entries() -> list[tuple[str, Entry]]:
    """(relative name, entry) for every corpus file, sorted."""
    return [
        (f"{path.parent.name}/{path.stem}", json.loads(path.read_text()))
        for path in sorted(CORPUS_DIR.glob("*/*.json"))
    ]


def saving() -> bool:
    return os.environ.get("FUZZ_SAVE_CORPUS") == "1"


_known: dict[str, set[str]] = {}


def _signatures(seed: str) -> set[str]:
    if seed not in _known:
        _known[seed] = {
            e.get("signature", "") for _, e in entries() if e["seed"] == seed and "signature" in e
        }
    return _known[seed]


def maybe_save(entry: Entry, signature: str) -> None:
    """Keep ``entry`` if its outcome is new for its seed (only when saving)."""
    if not saving() or "known-bug" in signature:  # those have their xfail entries
        return
    known = _signatures(entry["seed"])
    if signature in known or len(known) >= MAX_SAVED_PER_SEED:
        return
    known.add(signature)
    body = dict(entry, signature=signature)
    text = json.dumps(body, indent=1, sort_keys=True)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    d = CORPUS_DIR / entry["fmt"]
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{entry['seed']}-{digest}.json").write_text(text + "\n")
