"""The service: the daemon's loop and lifecycle, and the command line."""
