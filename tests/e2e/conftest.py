"""The guest (kernel + initramfs) is built once per session; tests skip when it cannot be."""

from __future__ import annotations

import pytest

from tests.conftest import require_tools
from tests.e2e.guest import Guest, GuestUnavailable, build_guest, known_files, sha256_digests


@pytest.fixture(scope="session")
def files() -> dict[str, bytes]:
    """The known files on the guest's disk; /init holds their sha256 digests."""
    return known_files()


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> Guest:
    require_tools("qemu-system-x86_64")
    try:
        return build_guest(tmp_path_factory.mktemp("e2e-guest"), sha256_digests(files))
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
