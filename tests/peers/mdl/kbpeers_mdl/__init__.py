"""Middle-layer devices for kbstream's interop tests (see devices.py)."""
