"""``python -m genlab`` (and ``torchrun -m genlab ...``) is the ``genlab`` command."""

import sys

from genlab.cli import main

sys.exit(main())
