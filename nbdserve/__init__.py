"""nbdserve: a Network Block Device server for raw, qcow2, parallels and FVD images."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
