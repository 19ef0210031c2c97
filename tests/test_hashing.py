"""Code versions and dependency hashes: what decides that work can be skipped."""

import uuid

from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs
from flowstone.runtime.hashing import code_version, dependency_hash


def asset_from(source: str, name: str = "f", first_line: int = 1) -> fs.Asset:
    """An asset whose function is compiled from ``source`` at a chosen line."""
    namespace: dict = {}
    exec(compile("\n" * (first_line - 1) + source, f"<{name}>", "exec"), namespace)
    return fs.Asset(name="a", execute_fn=namespace["f"])


BODY = "def f(ctx, deps):\n    return {'rows': [1, 2, 3], 'tags': {'x', 'y'}}\n"


def test_an_explicit_code_version_wins():
    assert code_version(fs.Asset(name="a", execute_fn=lambda c, d: 1, code_version="v7")) == "v7"


def test_the_same_code_has_the_same_version_wherever_it_is_defined():
    assert code_version(asset_from(BODY)) == code_version(asset_from(BODY, name="elsewhere", first_line=40))


def test_changed_code_or_constants_change_the_version():
    base = code_version(asset_from(BODY))
    assert code_version(asset_from(BODY.replace("[1, 2, 3]", "[1, 2, 4]"))) != base
    assert code_version(asset_from(BODY.replace("return", "return ctx or"))) != base


def test_the_version_is_the_same_in_another_process_with_other_hash_seeds():
    """Set constants iterate in string-hash order, which changes per process; a
    persisted dependency hash must not."""
    import subprocess
    import sys

    script = (
        "from flowstone.runtime.hashing import code_version\n"
        "import flowstone as fs\n"
        "def f(ctx, deps):\n"
        "    return ctx in {'alpha', 'beta', 'gamma', 'delta', 'epsilon'}\n"
        "print(code_version(fs.Asset(name='a', execute_fn=f)))\n"
    )
    versions = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(versions) == 1 and next(iter(versions)).startswith("code:")


ids = st.lists(st.uuids(), max_size=4)


@given(st.text(), st.one_of(st.none(), st.text()), st.dictionaries(st.text(max_size=5), ids, max_size=3))
def test_dependency_hash_is_deterministic_and_order_free(version, key, upstream):
    shuffled = {name: list(reversed(values)) for name, values in reversed(list(upstream.items()))}
    assert dependency_hash(version, key, upstream) == dependency_hash(version, key, shuffled)


@given(st.text(), st.one_of(st.none(), st.text()), st.text(), st.one_of(st.none(), st.text()))
def test_different_versions_or_partitions_give_different_hashes(v1, k1, v2, k2):
    if (v1, k1) != (v2, k2):
        assert dependency_hash(v1, k1, {}) != dependency_hash(v2, k2, {})


def test_no_partition_and_an_empty_partition_key_differ():
    assert dependency_hash("1", None, {}) != dependency_hash("1", "", {})


def test_reading_a_different_materialization_changes_the_hash():
    a, b = uuid.uuid4(), uuid.uuid4()
    assert dependency_hash("1", None, {"raw": [a]}) != dependency_hash("1", None, {"raw": [b]})
    assert dependency_hash("1", None, {"raw": [a]}) != dependency_hash("1", None, {"raw2": [a]})
