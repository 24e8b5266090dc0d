"""``python -m service``: serve a bundle over gRPC (see ``service.cli``)."""

from __future__ import annotations

import sys

from service.cli import main

sys.exit(main())
