"""driftloop monitor: windows, statistics, incidents and the daemon that wires them."""
