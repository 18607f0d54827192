"""``python -m citadel`` is the ``citadel`` command."""

import sys

from citadel.cli import main

sys.exit(main())
