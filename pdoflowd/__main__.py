"""``python -m pdoflowd``: the same as the ``pdoflowd`` command."""

import sys

from pdoflowd.daemon.command import main

sys.exit(main())
