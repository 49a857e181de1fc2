"""Memory safety and twin agreement of the bridge codec (findings of a code review)."""

import threading
import warnings

import numpy as np
import pytest

from kbstream import errors


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_arrays_keep_a_resizable_frame_exported(impl, version):
    """An array viewing a bytearray frame must keep it from being resized or freed."""
    frames = impl.serialize({"src": {"a": np.arange(4096, dtype=np.float64)}}, protocol_version=version)
    frames = [bytearray(bytes(f)) for f in frames]
    data, _ = impl.deserialize(frames)
    arr = data["src"]["a"]
    with pytest.raises(BufferError):
        frames[-1].clear()
    assert arr[:3].tolist() == [0.0, 1.0, 2.0]
    del data, arr
    frames[-1].clear()  # once the array is gone the frame is free again


def test_packing_a_dict_that_changes_under_its_keys_raises_instead_of_crashing(impl):
    outer = {}

    class ChangingKey(dict):
        __hash__ = object.__hash__

        def items(self):
            outer.clear()  # drops the only reference to the value being packed
            return super().items()

    outer[ChangingKey()] = ["x" * 100, 12345, [1.5] * 50]
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        impl.packb(outer)


def test_dtype_checks_leave_the_process_warning_filters_alone(impl):
    before = list(warnings.filters)
    ok = impl.serialize({"s": {"a": np.zeros(2, np.uint8)}})
    bogus = [b"a5", b"O", b"u1,u1", b"nonsense", b"<u2[", b"datetime64[xyz]"]

    def decode_bogus():
        for name in bogus * 20:
            frames = list(ok)
            hdr = impl.unpackb(bytes(frames[2]))
            hdr["dtype"] = name.decode()
            frames[2] = impl.packb(hdr)
            try:
                impl.deserialize(frames)
            except errors.ProtocolError:
                pass

    threads = [threading.Thread(target=decode_bogus) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, 5])
def test_v1_msgpack_numpy_type_must_be_a_string(impl, bad):
    frame = impl.packb({"src": {"a": {b"nd": True, b"type": bad, b"kind": b"", b"shape": [1],
                                      b"data": b"\x00"}}}, )
    with pytest.raises(errors.ProtocolError):
        impl.deserialize([frame])


def test_v1_msgpack_numpy_kind_must_be_bytes(impl):
    frame = impl.packb({"src": {"a": {b"nd": True, b"type": b"|u1", b"kind": [1], b"shape": [1],
                                      b"data": b"\x00"}}})
    with pytest.raises(errors.ProtocolError):
        impl.deserialize([frame])


def test_encoders_agree_on_int_subclasses_and_empty_memoryviews():
    from kbstream.bridge import _codec, _pure

    class Weird(int):
        def __int__(self):
            return 99

    assert _codec.packb(Weird(5)) == _pure.packb(Weird(5)) == b"\x05"
    empty = memoryview(np.zeros((0, 3)))
    assert _codec.packb(empty) == _pure.packb(empty) == b"\xc4\x00"


@pytest.mark.parametrize("order", ["value-first", "array-first"])
def test_encode_error_order_matches_the_pure_twin(order):
    """With a bad value and an unsendable array in one source, both codecs report the
    same error: the array's dtype is checked where it comes, the values are packed after."""
    from kbstream.bridge import _codec, _pure
    bad_value = ("v", object())
    bad_array = ("a", np.array([object()], dtype=object))
    props = dict([bad_value, bad_array] if order == "value-first" else [bad_array, bad_value])
    messages = []
    for impl in (_codec, _pure):
        with pytest.raises(errors.EncodeError) as info:
            impl.serialize({"s": props})
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "array 'a'" in messages[0]
