"""``python -m pdoflowd.cli``: the same as the ``pdoflow`` command."""

import sys

from pdoflowd.cli import main

sys.exit(main())
