"""``python -m et_transformers``: the ``et-transformers`` command line."""

import sys

from .cli import main

sys.exit(main())
