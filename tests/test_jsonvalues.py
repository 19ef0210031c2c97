"""Strict JSON for what the stores write: the remembered text of small mappings."""

from __future__ import annotations

import re
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs
from flowstone.plumbing.jsonvalues import mapping_to_json, plain, text_problem, to_json


@pytest.mark.parametrize("value", [
    {}, {"flowstone.io_manager": "memory"}, {"a": 1}, {"a": True}, {"a": 1.0}, {"a": None}, {"é": "ü"},
    {"nested": {"b": [1, 2]}}, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
])
def test_mapping_to_json_writes_what_to_json_writes(value):
    for _ in range(2):  # written, then remembered
        assert mapping_to_json(MappingProxyType(value)) == to_json(plain(value))


def test_equal_values_of_other_types_are_not_mixed_up():
    assert [mapping_to_json({"a": v}) for v in (1, True, 1.0, 1, True)] == [
        '{"a":1}', '{"a":true}', '{"a":1.0}', '{"a":1}', '{"a":true}']


def test_what_cannot_be_stored_is_refused_each_time_naming_the_asset():
    for _ in range(2):
        with pytest.raises(fs.SerializationError, match="NUL") as info:
            mapping_to_json({"a": "x\x00y"}, asset="orders", what="metadata")
        assert info.value.asset == "orders"
        with pytest.raises(fs.SerializationError, match="nan"):
            mapping_to_json({"a": float("nan")})


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())), st.sampled_from(["", "\x00", "\ud800", "é"]))
def test_a_text_problem_is_a_nul_or_a_lone_surrogate_whatever_the_texts_kind(text, extra):
    """``text_problem`` answers ASCII text without the regular expression (NUL by a
    plain search): the same answer as the expression for any text, ASCII or not."""
    for candidate in (text, text + extra, extra + text):
        found = re.search("[\x00\ud800-\udfff]", candidate)
        problem = text_problem(candidate)
        assert (problem is None) == (found is None)
        if found is not None and found.group() == "\x00":
            assert problem == "a NUL character (\\u0000)"
        elif found is not None:
            assert problem is not None and "lone surrogate" in problem
