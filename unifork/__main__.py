"""``python -m unifork``: the same as the ``unifork`` command."""

import sys

from unifork.cli import main

sys.exit(main())
