"""Package surface: the compiled backends are in use, the public names exist."""

import os
from pathlib import Path

import kbhash


def test_kbhash_backend_is_compiled_unless_pure_requested():
    if os.environ.get("KB_IMPL", "").lower() == "pure":
        assert kbhash.backend == "pure"
    else:
        assert kbhash.backend == "cython"
        assert kbhash.encode.__module__ == "kbhash._codec" or "cython" in repr(kbhash.encode)


def test_kbhash_public_names():
    for name in kbhash.__all__:
        assert hasattr(kbhash, name), name
    assert issubclass(kbhash.DecodeError, ValueError)
    assert issubclass(kbhash.TruncatedError, kbhash.DecodeError)
    assert issubclass(kbhash.EncodeError, TypeError)


def test_kbhash_ships_typing_marker_and_sources():
    root = Path(kbhash.__file__).parent
    assert (root / "py.typed").exists()


def test_kbstream_channel_and_broker_public_names():
    import kbstream.broker
    import kbstream.pipeline
    from kbstream.broker.server import ServerInstance
    from kbstream.pipeline.schema import Image, Vector

    for mod in (kbstream.pipeline, kbstream.broker):
        for name in mod.__all__:
            assert hasattr(mod, name), (mod.__name__, name)
    # what a data schema is declared with, and the server devices name
    assert kbstream.pipeline.Vector is Vector and kbstream.pipeline.Image is Image
    assert {"DataSchema", "Vector", "Image"} <= set(kbstream.pipeline.__all__)
    assert kbstream.broker.ServerInstance is ServerInstance
    assert "ServerInstance" in kbstream.broker.__all__
    assert issubclass(ServerInstance, kbstream.broker.BrokerInstance)
