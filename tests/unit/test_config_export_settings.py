"""Driver settings given directly on [[export]] (qcow2 ``compress``,
``compress_cache_size``) land in the export's ``settings`` like the
``[export.settings]`` form."""

from __future__ import annotations

from typing import Any

import pytest

from nbdserve.config import config_from_mapping
from nbdserve.errors import ConfigError


def _settings(**export: Any) -> dict[str, Any]:
    config = config_from_mapping({"export": [{"path": "/img", **export}]})
    return dict(config.exports[0].settings)


def test_compress_keys_on_the_export_become_settings() -> None:
    assert _settings(compress=True, compress_cache_size=0) == {
        "compress": True,
        "compress_cache_size": 0,
    }


def test_they_merge_with_other_settings() -> None:
    got = _settings(compress=True, settings={"compress_threads": 3})
    assert got == {"compress": True, "compress_threads": 3}


def test_the_settings_table_still_works() -> None:
    assert _settings(settings={"compress": True, "compress_cache_size": 65536}) == {
        "compress": True,
        "compress_cache_size": 65536,
    }


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"compress.*both"):
        _settings(compress=True, settings={"compress": False})


@pytest.mark.parametrize(
    ("key", "value"), [("compress", "yes"), ("compress", 1), ("compress_cache_size", True)]
)
def test_wrong_types_are_refused_with_the_key_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        _settings(**{key: value})


def test_other_unknown_keys_are_still_refused() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        _settings(compress_level=3)
