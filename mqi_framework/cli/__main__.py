"""``python -m mqi_framework.cli``: the same as ``mqi-host`` (the host starts its workers this way)."""

import sys

from mqi_framework.cli import main

sys.exit(main())
