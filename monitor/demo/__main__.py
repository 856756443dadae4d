"""``python -m monitor.demo``: the demo loop (monitor/demo/loop.py)."""

import sys

from monitor.demo.loop import main

sys.exit(main())
