"""``python -m softxent.cli`` = the ``softxent`` command."""

import sys

from . import main

sys.exit(main())
