"""Hash.from_typed / Hash.set_typed / HashTemplate: filling a Hash with already-typed nodes."""

import pytest

import kbhash
from kbhash import EncodeError, Hash, HashTemplate, HashType, Timestamp

T = HashType


def _by_set():
    """The reference Hash, built with the path-taking methods."""
    h = Hash()
    h.set("sizes", [120, 4096, 8], type=T.VECTOR_UINT32)
    h.set("n", 3, type=T.UINT32)
    h["source"] = "SA1/DET/CAM:output"
    h["flag"] = True
    h.set_timestamp("flag", Timestamp(1700000000, 250, 10**10))
    h.set_attribute("flag", "unit", "none")
    return h


def _typed_entries():
    return [
        ("sizes", [120, 4096, 8], T.VECTOR_UINT32),
        ("n", 3, int(T.UINT32)),
        ("source", "SA1/DET/CAM:output", None),
        ("flag", True, None, {"sec": 1700000000, "frac": 250, "tid": 10**10, "unit": "none"},
         {"sec": T.UINT64, "frac": T.UINT64, "tid": int(T.UINT64)}),
    ]


def test_from_typed_equals_the_hash_built_with_set(codec):
    h = Hash.from_typed(_typed_entries())
    ref = _by_set()
    assert h == ref
    assert list(h) == ["sizes", "n", "source", "flag"]
    assert h.get_type("sizes") is T.VECTOR_UINT32 and h.get_type("n") is T.UINT32
    assert not h.has_explicit_type("source") and h.get_type("source") is T.STRING
    assert h.get_timestamp("flag") == Timestamp(1700000000, 250, 10**10)
    assert h.get_attribute_type("flag", "tid") is T.UINT64
    assert h.get_attribute_type("flag", "unit") is T.STRING
    assert codec.encode_bytes(h) == codec.encode_bytes(ref)
    assert kbhash.decode(codec.encode_bytes(h)) == ref


def test_hashtype_members_and_plain_ids_give_the_same_hash(codec):
    a = Hash.from_typed([("a", 1, T.UINT16, {"x": 2}, {"x": T.INT8})])
    b = Hash.from_typed([("a", 1, 10, {"x": 2}, {"x": 4})])
    assert a == b and codec.encode_bytes(a) == codec.encode_bytes(b)
    assert a.get_type("a") is T.UINT16 and b.get_attribute_type("a", "x") is T.INT8
    assert kbhash.decode(codec.encode_bytes(a)) == a


def test_values_are_stored_as_given():
    inner = Hash("x", 1)
    items = [inner]
    h = Hash.from_typed([("h", inner, T.HASH), ("v", items, T.VECTOR_HASH), ("d", {"k": 1}, T.HASH)])
    assert h["h"] is inner and h["v"] is items
    assert type(h["d"]) is dict  # not converted: the encoder still writes it as a HASH
    assert kbhash.decode(kbhash.encode_bytes(h))["d"] == Hash("k", 1)


def test_keys_are_top_level_and_literal():
    h = Hash.from_typed([("a.b", 1, None)])
    assert list(h) == ["a.b"] and h["a.b"] == 1 and not isinstance(h.get("a"), Hash)


def test_attributes_are_copied():
    attrs, atypes = {"tid": 5}, {"tid": T.UINT64}
    h = Hash.from_typed([("a", 1, None, attrs, atypes)])
    attrs["tid"] = 6
    atypes["tid"] = T.INT8
    assert h.get_attribute("a", "tid") == 5 and h.get_attribute_type("a", "tid") is T.UINT64


def test_four_item_entries_infer_attribute_types():
    h = Hash.from_typed([("a", 1, None, {"unit": "mm", "n": 3})])
    assert h.get_attribute_type("a", "unit") is T.STRING and h.get_attribute_type("a", "n") is T.INT32


def test_set_typed_on_existing_nodes_keeps_place_and_other_attributes():
    h = Hash("a", 1, "b", 2)
    h.set("a", 1, type=T.UINT64)
    h.set_attribute("a", "unit", "mm")
    h.set_attribute("a", "tid", 7, T.UINT64)
    h.set_typed([("a", 5, None, {"tid": 8})])
    assert list(h) == ["a", "b"]
    assert h["a"] == 5 and not h.has_explicit_type("a")  # None forgets the explicit type
    assert h.attrs("a") == {"unit": "mm", "tid": 8}
    assert h.get_attribute_type("a", "tid") is T.INT32  # set anew: its old explicit type is gone
    h.set_typed([("b", 3, T.UINT8), ("c", "new", None)])
    assert list(h) == ["a", "b", "c"] and h.get_type("b") is T.UINT8 and h.attrs("a")["unit"] == "mm"


def test_set_typed_accepts_any_iterable():
    h = Hash()
    h.set_typed(iter([("a", 1, None)]))
    h.set_typed((("b", 2, T.UINT8),))
    assert h == Hash.from_typed([("a", 1, None), ("b", 2, T.UINT8)])


@pytest.mark.parametrize("bad", [99, 33, -1, "UINT32", 1.5, 1000, [14]])
def test_unknown_type_ids_are_encode_errors(bad):
    with pytest.raises(EncodeError, match="not a Karabo type id"):
        Hash.from_typed([("a", 1, bad)])
    with pytest.raises(EncodeError, match="not a Karabo type id"):
        Hash.from_typed([("a", 1, None, {"x": 1}, {"x": bad})])


def test_a_type_for_a_missing_attribute_is_an_encode_error():
    with pytest.raises(EncodeError, match="'y'"):
        Hash.from_typed([("a", 1, None, {"x": 1}, {"y": T.UINT8})])


def test_bad_keys_and_entries():
    with pytest.raises(TypeError, match="str"):
        Hash.from_typed([(1, 1, None)])
    with pytest.raises(KeyError, match="255 bytes"):
        Hash.from_typed([("ü" * 128, 1, None)])
    ok = "ü" * 127  # 254 bytes
    assert list(Hash.from_typed([(ok, 1, None)])) == [ok]
    with pytest.raises(TypeError, match="not 2 items"):
        Hash.from_typed([("a", 1)])
    with pytest.raises(TypeError, match="not 6 items"):
        Hash.from_typed([("a", 1, None, {}, {}, 0)])


def test_a_mismatched_value_fails_when_encoded(codec):
    h = Hash.from_typed([("a", "text", T.UINT32)])
    with pytest.raises(EncodeError):
        codec.encode_bytes(h)


# ---------------------------------------------------------------- HashTemplate

LAYOUT = [
    ("sizes", T.VECTOR_UINT32),
    ("n", int(T.UINT32)),
    ("source", None),
    ("flag", None, [("sec", T.UINT64), ("frac", T.UINT64), ("tid", int(T.UINT64)), ("unit", None)]),
]


def _build(template):
    return template.build(
        {"sizes": [120, 4096, 8], "n": 3, "source": "SA1/DET/CAM:output", "flag": True},
        {"flag": {"sec": 1700000000, "frac": 250, "tid": 10**10, "unit": "none"}},
    )


def test_template_build_equals_the_hash_built_with_set(codec):
    tpl = HashTemplate(LAYOUT)
    assert tpl.keys == ("sizes", "n", "source", "flag")
    h = _build(tpl)
    ref = _by_set()
    assert h == ref == Hash.from_typed(_typed_entries())
    assert list(h) == ["sizes", "n", "source", "flag"]
    assert h.get_type("n") is T.UINT32 and not h.has_explicit_type("source")
    assert h.get_attribute_type("flag", "tid") is T.UINT64 and h.get_attribute_type("flag", "unit") is T.STRING
    assert codec.encode_bytes(h) == codec.encode_bytes(ref)


def test_template_builds_are_independent():
    tpl = HashTemplate(LAYOUT)
    values = {"sizes": [1], "n": 1, "source": "s", "flag": False}
    attrs = {"sec": 1, "frac": 2, "tid": 3, "unit": "u"}
    a = tpl.build(values, {"flag": attrs})
    values["n"] = 99
    attrs["tid"] = 99
    a.set("n", 5, type=T.UINT8)
    a.set_attribute("flag", "tid", 7, T.INT8)
    a.set_attribute("flag", "extra", 1)
    b = tpl.build({"sizes": [1], "n": 1, "source": "s", "flag": False},
                  {"flag": {"sec": 1, "frac": 2, "tid": 3, "unit": "u"}})
    assert b.get_type("n") is T.UINT32 and b.get_attribute_type("flag", "tid") is T.UINT64
    assert "extra" not in b.attrs("flag") and b["n"] == 1 and b.get_attribute("flag", "tid") == 3


def test_template_nodes_without_attribute_values_have_none():
    h = HashTemplate(LAYOUT).build({"sizes": [], "n": 0, "source": "", "flag": True})
    assert not h.has_attribute("flag", "sec") and len(h.attrs("flag")) == 0
    assert kbhash.decode(kbhash.encode_bytes(h)) == h


def test_template_build_checks_keys_and_attribute_names():
    tpl = HashTemplate(LAYOUT)
    good = {"sizes": [], "n": 0, "source": "", "flag": True}
    with pytest.raises(KeyError, match="template's keys"):
        tpl.build({"n": 0, "sizes": [], "source": "", "flag": True})  # order matters
    with pytest.raises(KeyError, match="template's keys"):
        tpl.build({"sizes": [], "n": 0, "source": ""})
    with pytest.raises(KeyError, match="template's keys"):
        tpl.build({**good, "more": 1})
    with pytest.raises(KeyError, match="'source'"):
        tpl.build(good, {"source": {"unit": "mm"}})
    with pytest.raises(KeyError, match="'flag'"):
        tpl.build(good, {"flag": {"sec": 1, "frac": 2, "tid": 3}})
    with pytest.raises(KeyError, match="'flag'"):
        tpl.build(good, {"flag": {"frac": 2, "sec": 1, "tid": 3, "unit": ""}})


@pytest.mark.parametrize("nodes, error, match", [
    ([("a", 99)], EncodeError, "not a Karabo type id"),
    ([("a", None, [("x", "UINT8")])], EncodeError, "not a Karabo type id"),
    ([("a", None), ("a", T.UINT8)], KeyError, "twice"),
    ([("a", None, [("x", None), ("x", T.UINT8)])], KeyError, "twice"),
    ([(1, None)], TypeError, "str"),
    ([("a", None, [(1, None)])], TypeError, "str"),
    ([("ü" * 128, None)], KeyError, "255 bytes"),
    (["a"], TypeError, "template nodes"),
    ([("a", None, [], "x")], TypeError, "template nodes"),
])
def test_template_checks_its_layout_once(nodes, error, match):
    with pytest.raises(error, match=match):
        HashTemplate(nodes)


def test_template_values_may_be_any_mapping():
    tpl = HashTemplate([("a", T.UINT8), ("b", None)])
    src = Hash("a", 1, "b", "x")
    h = tpl.build(src, {})
    assert h == Hash.from_typed([("a", 1, T.UINT8), ("b", "x", None)])
    src["a"] = 2
    assert h["a"] == 1
