"""``python -m nbdserve``."""

from __future__ import annotations

import sys

from nbdserve.cli import main

sys.exit(main())
