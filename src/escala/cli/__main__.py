"""``python -m escala.cli``: the same as the ``escala`` command."""

import sys

from escala.cli import main

sys.exit(main())
