"""The train matcher: Karabo pipeline outputs in, matched trains out to bridge clients.

One :class:`~kbstream.pipeline.InputChannel` per source receives items; the matching
(:mod:`kbstream.matcher.core`, a pure state machine) puts the items of one train id
together; each matched train goes to one or more bridge outputs
(:class:`kbstream.bridge.sender.Sender`, each in its own thread behind a bounded queue).

Rooms (arrows point down)::

    cli.py      kbstream-bridge / kbstream bridge: the command
    matcher.py  TrainMatcher: inputs, outputs, threads, statistics; parse_source
    core.py     MatchCore: matching by train id, modes, bounds, counters (no I/O, no clock)
    errors.py   MatcherError and its leaves

``import kbstream.matcher`` loads the core and the errors only; :class:`TrainMatcher` and
:func:`parse_source` (which need the pipeline and the bridge sockets) load on first use.
Options and counters: ``docs/matcher.md``.
"""

from .._lazy import lazy

from .core import DROPPED_REASONS, INCOMPLETE_REASONS, MODES, MatchCore, Train
from .errors import (
    MatcherConfigError,
    MatcherError,
    MatcherStateError,
    SourceSpecError,
    UnknownSourceError,
    UnresolvedSourceError,
)

_LAZY = {"TrainMatcher": "matcher", "SourceSpec": "matcher", "parse_source": "matcher",
         "parse_output": "matcher", "MISSING_KEY": "matcher"}
_LAZY.update(KaraboMatcher="karabo")  # on a Karabo broker (docs/matcher-karabo.md)

__all__ = [
    "TrainMatcher",
    "KaraboMatcher",
    "SourceSpec",
    "parse_source",
    "parse_output",
    "MISSING_KEY",
    "MatchCore",
    "Train",
    "MODES",
    "INCOMPLETE_REASONS",
    "DROPPED_REASONS",
    "MatcherError",
    "SourceSpecError",
    "UnresolvedSourceError",
    "UnknownSourceError",
    "MatcherConfigError",
    "MatcherStateError",
]

__getattr__, __dir__ = lazy(__name__, _LAZY, __all__)
