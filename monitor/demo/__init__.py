"""`make demo`: the whole loop in its own world (docs/demo.md); `python -m monitor.demo`."""
