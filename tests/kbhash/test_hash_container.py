"""The Hash container: paths, types, attributes, iteration, dict conversion."""

import numpy as np
import pytest

from kbhash import Attributes, Hash, HashType, ImageData, Timestamp

T = HashType


def test_paths_create_nested_hashes_in_order():
    h = Hash()
    h["a.b.c"] = 1
    h["a.b.d"] = "x"
    h["z"] = 2.5
    assert list(h) == ["a", "z"]
    assert isinstance(h["a"], Hash) and isinstance(h["a.b"], Hash)
    assert h["a.b.c"] == 1 and h["a"]["b"]["d"] == "x"
    assert list(h.paths()) == ["a.b.c", "a.b.d", "z"]
    assert list(h.paths(intermediate=True)) == ["a", "a.b", "a.b.c", "a.b.d", "z"]
    assert dict(h.flat_items()) == {"a.b.c": 1, "a.b.d": "x", "z": 2.5}
    assert "a.b.c" in h and "a.b.x" not in h and "q" not in h


def test_constructor_forms():
    assert Hash("a", 1, "b.c", 2) == Hash({"a": 1, "b": {"c": 2}})
    with pytest.raises(TypeError):
        Hash("a")
    with pytest.raises(TypeError):
        Hash(5)
    copy = Hash(Hash("a", 1))
    assert copy == Hash("a", 1)


def test_custom_separator():
    h = Hash()
    h.set("a/b", 1, sep="/")
    assert h["a"]["b"] == 1
    assert h.get("a/b", sep="/") == 1
    assert h.get("a/x", default=7, sep="/") == 7
    h.set("x.y", 2, sep="/")  # a flat key containing a dot
    assert h["x.y"] == 2 and list(h) == ["a", "x.y"]


def test_setting_through_a_leaf_is_an_error():
    h = Hash("a", 1)
    with pytest.raises(TypeError, match="'a' is not a Hash"):
        h["a.b"] = 2
    assert h["a"] == 1


def test_delete_and_pop():
    h = Hash("a.b", 1, "a.c", 2, "d", 3)
    del h["a.b"]
    assert list(h.paths()) == ["a.c", "d"]
    assert h.pop("d") == 3 and h.pop("d", None) is None
    with pytest.raises(KeyError):
        del h["nope"]
    with pytest.raises(KeyError):
        h["nope.deeper"]


def test_explicit_types_and_reassignment():
    h = Hash()
    h.set("n", 5, type=T.UINT8)
    assert h.get_type("n") == T.UINT8 and h.has_explicit_type("n")
    h["n"] = 6  # plain assignment forgets the explicit type, as karabind does
    assert h.get_type("n") == T.INT32 and not h.has_explicit_type("n")
    h.set("v", [1, 2], type=T.VECTOR_INT64)
    assert h.get_type("v") == T.VECTOR_INT64
    h["arr"] = np.zeros((2, 2), np.float32)
    assert h.get_type("arr") == T.HASH  # an NDArray is a HASH node on the wire


def test_attributes():
    h = Hash("a.b", 1)
    h.set_attribute("a.b", "unit", "m")
    h.set_attribute("a.b", "scale", 3, type=T.UINT16)
    h["a.b", "alias"] = "x.y"
    assert h.get_attribute("a.b", "unit") == "m"
    assert h["a.b", "alias"] == "x.y"
    assert h.get_attribute_type("a.b", "scale") == T.UINT16
    assert h.get_attribute_type("a.b", "unit") == T.STRING
    assert list(h.attrs("a.b")) == ["unit", "scale", "alias"]
    assert h.has_attribute("a.b", "unit") and not h.has_attribute("a.b", "nope")
    assert h.get_attribute("a.b", "nope", None) is None
    with pytest.raises(KeyError):
        h.get_attribute("a.b", "nope")
    attrs = h.attrs("a.b")
    assert isinstance(attrs, Attributes) and attrs == {"unit": "m", "scale": 3, "alias": "x.y"}
    del attrs["alias"]
    assert not h.has_attribute("a.b", "alias")


def test_timestamps():
    h = Hash("data", 1)
    ts = Timestamp(1700000000, 5 * 10**17, 12345)
    h.set_timestamp("data", ts)
    assert h.get_timestamp("data") == ts
    assert [(k, h.get_attribute_type("data", k)) for k in h.attrs("data")] == [
        ("sec", T.UINT64), ("frac", T.UINT64), ("tid", T.UINT64)]
    assert ts.time == pytest.approx(1700000000.5)
    assert Timestamp.from_time(1700000000.25, 7) == Timestamp(1700000000, 25 * 10**16, 7)
    with pytest.raises(ValueError):
        Timestamp(0, 10**18)
    with pytest.raises(KeyError):
        Hash("x", 1).get_timestamp("x")


def test_equality_is_order_type_and_attribute_sensitive():
    a = Hash("x", 1, "y", 2)
    assert a == Hash("x", 1, "y", 2)
    assert a != Hash("y", 2, "x", 1)
    b = Hash("x", 1, "y", 2)
    b.set("y", 2, type=T.INT64)
    assert a != b
    c = Hash("x", 1, "y", 2)
    c.set_attribute("x", "unit", "m")
    assert a != c
    assert Hash("f", float("nan")) == Hash("f", float("nan"))
    assert Hash("a", np.arange(3)) == Hash("a", np.arange(3))
    assert Hash("a", np.arange(3)) != Hash("a", np.arange(3, dtype=np.int32))


def test_dict_conversion():
    d = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": [{"f": 1}]}
    h = Hash.from_dict(d)
    assert isinstance(h["e"][0], Hash)
    assert h.to_dict() == d
    assert h.to_dict(flat=True) == {"a.b": 1, "a.c": [1, 2], "d": "x", "e": [{"f": 1}]}
    assert Hash.from_dict({"a.b": 1, "c": 2}, flat=True) == Hash("a.b", 1, "c", 2)


def test_key_length_limit():
    Hash("k" * 255, 1)
    with pytest.raises(KeyError, match="at most 255 bytes"):
        Hash("k" * 256, 1)


def test_imagedata_defaults():
    img = ImageData(np.zeros((4, 5, 3), np.uint16))
    assert img.encoding.name == "RGB" and img.bitsPerPixel == 48 and img.dims == [4, 5, 3]
    assert ImageData(np.zeros((2, 2, 7), np.uint8)).encoding.name == "GRAY"
    assert ImageData(np.zeros(4, np.uint8)).encoding.name == "UNDEFINED"
    assert ImageData(np.zeros(4, np.uint8)).bitsPerPixel == 0


def test_pretty_mentions_types():
    h = Hash("a.b", 1, "arr", np.zeros(3, np.uint8))
    text = h.pretty()
    assert "INT32" in text and "NDArray uint8 (3,)" in text
