"""Tools around a Karabo Bridge stream: ``simulate`` (a server of realistic simulated
detector data), ``monitor`` (a live view of a stream) and ``glimpse`` (one train's
structure).  Each has a ``main(argv)`` used by the ``kbstream`` command.
"""
