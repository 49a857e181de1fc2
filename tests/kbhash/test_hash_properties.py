"""Property tests: round trips, and the compiled codec against its pure twin."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashcontent import hash_to_content
from hashstrategies import hashes, plain_dicts
from kbhash import Hash, _pure

try:
    from kbhash import _codec
except ImportError:  # test_package fails loudly in that case
    _codec = _pure

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(hashes("all"))
def test_roundtrip_preserves_everything(h):
    for codec in (_codec, _pure):
        data = codec.encode_bytes(h)
        back = codec.decode(data)
        assert back == h
        assert hash_to_content(back) == hash_to_content(h)
        # and a second trip gives the same bytes
        assert codec.encode_bytes(back) == data


@SETTINGS
@given(hashes("all"))
def test_compiled_and_pure_give_identical_bytes_and_layout(h):
    a = _codec.encode(h)
    b = _pure.encode(h)
    assert [bytes(x) for x in a] == [bytes(x) for x in b]


@SETTINGS
@given(hashes("all"))
def test_decode_from_buffer_list_equals_decode_from_bytes(h):
    bufs = _codec.encode(h)
    joined = b"".join(bytes(b) for b in bufs)
    for codec in (_codec, _pure):
        assert codec.decode(bufs) == codec.decode(joined) == h


@SETTINGS
@given(plain_dicts)
def test_inferred_types_agree_between_codecs(d):
    h = Hash(d)
    assert _codec.encode_bytes(h) == _pure.encode_bytes(h)
    back = _codec.decode(_codec.encode_bytes(h))
    assert back.to_dict() .keys() == h.to_dict().keys()
    assert hash_to_content(back) == hash_to_content(h)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4), st.sampled_from(["<u2", ">u2", "<f4", "u1", "<i8"]))
def test_ndarray_payloads_are_zero_copy(shape, dt):
    arr = np.arange(int(np.prod(shape)), dtype=dt).reshape(shape)
    h = Hash("a", arr)
    for codec in (_codec, _pure):
        bufs = codec.encode(h)
        if arr.size:
            assert np.shares_memory(np.frombuffer(bufs[1], np.uint8), arr)
        back = codec.decode(bufs)["a"]
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
        if arr.size:
            assert np.shares_memory(back, arr)  # decoding the buffer list: still the same memory
