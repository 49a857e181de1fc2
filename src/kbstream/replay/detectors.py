"""Stacking the module sources of one multi-module detector into one source.

What extra_data's ``--append-detector-modules`` sends, and where kbstream differs
(``docs/replay-differences.md``):

- AGIPD, LPD and DSSC (``<det>/DET/<n>CH0:xtdf``): ``image.data``, ``image.gain`` and
  ``image.mask`` of all modules stacked with the module axis at -3 into 16 module slots
  (``extra_data.stack_detector_data``'s default, also for the 8 modules of an AGIPD 500K),
  NaN (floats) or 0 filling modules without data; the new source ``<det>/DET/APPEND``
  has every other key of one module and that module's ``'metadata'`` entry with
  ``source`` changed; the module sources are removed.
- kbstream takes the other keys from the lowest-numbered module with data; extra_data
  from whichever module its set of sources yields first.
- kbstream also stacks JUNGFRAU (``<det>/DET/JNGFR<n>:daqOutput``, modules 1..N, keys
  ``data.adc/gain/mask``) unless ``jungfrau=False``; extra_data sends them as they are.
- A module whose array has another shape or dtype than the others is filled like a
  missing one and reported (extra_data's server ends with a ValueError there); a train
  where no module has data is sent without the APPEND source (extra_data's ends too).
"""

from ..bridge.stacking import XTDF_MODULES, ModuleStacker
from .progress import Problems

__all__ = ["DetectorAppender", "XTDF_MODULES"]


class DetectorAppender:
    """Stack the module sources of one multi-module detector into one source.

    The stacking itself is :class:`kbstream.bridge.stacking.ModuleStacker` (shared with
    the train matcher); this class applies it to the replay's trains.

    Parameters
    ----------
    sources : iterable of str
        The selected sources.
    all_sources : iterable of str
        Every source of the run (the JUNGFRAU module count).
    jungfrau : bool
        Also stack JUNGFRAU modules (extra_data's commands do not).
    problems : Problems, optional
        Where modules that do not stack, and a selection without modules, are said.

    :attr:`modules` is empty when no module source is selected: the appender then leaves
    trains as they are (as extra_data does), which is said once.
    """

    def __init__(self, sources, all_sources, jungfrau=True, problems=None):
        self.problems = problems if problems is not None else Problems()
        self._stacker = ModuleStacker(sources, all_sources, jungfrau=jungfrau,
                                      left_out=self.problems.left_out, logger=self.problems.log)
        self.modules = self._stacker.modules
        self.keys = self._stacker.keys
        self.name = self._stacker.name
        self.nmodules = self._stacker.nmodules

    def __call__(self, item):
        if item.error is not None or not self.modules:
            return item
        buffer = item.slot.buffer if item.slot is not None else None
        item.nbytes += self._stacker.stack(item.data, item.metadata, buffer=buffer,
                                           train_id=item.file_train_id)
        return item
