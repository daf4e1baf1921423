"""``python -m hetlora`` = the ``hetlora`` command."""

import sys

from .cli import main

sys.exit(main())
