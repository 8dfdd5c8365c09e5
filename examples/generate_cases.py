#!/usr/bin/env python3
"""Write sample case folders into an inbox (same as the ``mqi-sample-case`` command).

    python examples/generate_cases.py quickstart/inbox --cases 3
    python examples/generate_cases.py quickstart/inbox --name "PARTIAL" --missing-beam 2

Needs mqi-moqui installed (``pip install -e plugins/mqi-moqui``); ``--help`` lists every option.
"""

import sys

from mqi_moqui.samples import main

if __name__ == "__main__":
    sys.exit(main())
