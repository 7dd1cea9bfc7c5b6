"""``python -m ddgpipe``: the same CLI, e.g. under ``torchrun -m ddgpipe train ...``."""

import sys

from ddgpipe.cli import main

sys.exit(main())
