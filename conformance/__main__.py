"""``python -m conformance`` is the ``normconf`` command."""

import sys

from conformance.cli import main

sys.exit(main())
