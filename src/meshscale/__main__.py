"""``python -m meshscale``: the same as the ``meshscale`` command."""

import sys

from meshscale.cli import main

sys.exit(main())
