"""The built-in demo image for ``nbdserve demo``: small, sparse, recognisable."""

from __future__ import annotations

import os

DEMO_SIZE = 64 * 1024 * 1024
BANNER = b"Hello from nbdserve! This disk is the built-in demo image.\n"


def make_demo_image(directory: str) -> str:
    """A sparse raw image with a banner at 0, a pattern at 1 MiB and a hole after."""
    path = os.path.join(directory, "demo.raw")
    with open(path, "wb") as f:
        f.truncate(DEMO_SIZE)
        f.write(BANNER)
        f.seek(1024 * 1024)
        f.write(bytes(range(256)) * 4096)  # 1 MiB of a counting pattern
    return path
