"""``python -m service.client``: the client CLI (see ``service.client.cli``)."""

from __future__ import annotations

import sys

from service.client.cli import main

sys.exit(main())
