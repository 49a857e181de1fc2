"""One error tree: every exception class kbstream defines is a KbStreamError, and the tree
drawn in kbstream.errors names it."""

import importlib
import inspect
import pkgutil

import kbstream
from kbstream import errors


def _all_modules():
    yield kbstream
    for info in pkgutil.walk_packages(kbstream.__path__, "kbstream."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def _exception_classes():
    found = {}
    for module in _all_modules():
        for name, obj in vars(module).items():
            # private classes (a leading underscore) are control flow inside one module
            # and never reach a caller
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__.startswith("kbstream")
                    and not obj.__name__.startswith("_")):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_kbstream_exception_is_in_the_tree():
    classes = _exception_classes()
    assert len(classes) >= 30  # the walk really found the subpackages' errors
    outside = [name for name, cls in classes.items() if not issubclass(cls, errors.KbStreamError)]
    assert outside == []


def test_the_drawn_tree_names_every_exception():
    drawn = errors.__doc__
    missing = [name for name, cls in _exception_classes().items() if cls.__name__ not in drawn]
    assert missing == []


def test_timeouts_and_state_errors_subclass_the_builtins():
    from kbstream.broker.errors import NotStartedError, RequestTimeout
    from kbstream.pipeline.errors import ChannelClosed, ConnectTimeout

    for cls in (errors.ChannelTimeout, ConnectTimeout, RequestTimeout):
        assert issubclass(cls, TimeoutError)
    for cls in (errors.ServerStateError, ChannelClosed, NotStartedError):
        assert issubclass(cls, errors.StateError) and issubclass(cls, RuntimeError)
    assert issubclass(errors.BindError, OSError)
