"""``python -m progdump``: the same as the ``progdump`` console script."""

import sys

from progdump.cli import main

sys.exit(main())
