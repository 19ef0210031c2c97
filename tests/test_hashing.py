"""Code versions and dependency hashes: what decides that work can be skipped."""

import types
import uuid
from pathlib import Path

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


def test_the_hash_of_given_inputs_never_changes():
    # Stored records carry these hashes: a different byte layout would make every
    # stored success look changed after an upgrade, and everything would run again.
    a = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
    b = uuid.UUID("01890a5d-ac96-7a1c-8c5e-3f5f2b0c1d2e")
    assert dependency_hash("1", None, {}) == "399743bfed64b8a408a93efedde98e85090d591434b79c7e437456a9851acf7e"
    assert dependency_hash("v2", "2024-01-01", {"raw": [a]}) == (
        "f94e18604cf613635535f5f520e24747ca6250e71cff2fdd29d5a6401f4a22a2")
    assert dependency_hash("v2", "é|x", {"raw": [b, a], "other": [a]}) == (
        "cb050cfd43057eed69ce8dfe313707cde86fb1d43721b98ecc793eae6b3bcaf1")


def test_reading_a_different_materialization_changes_the_hash():
    a, b = uuid.uuid4(), uuid.uuid4()
    assert dependency_hash("1", None, {"raw": [a]}) != dependency_hash("1", None, {"raw": [b]})
    assert dependency_hash("1", None, {"raw": [a]}) != dependency_hash("1", None, {"raw2": [a]})


# ------------------------------------------------ what the automatic version covers


def package(**sources: str) -> dict[str, types.ModuleType]:
    """Modules of one package ``mypkg``, each able to use the ones before it by name."""
    modules: dict[str, types.ModuleType] = {}
    for name, source in sources.items():
        module = types.ModuleType(f"mypkg.{name}")
        module.__dict__.update(modules)
        exec(compile(source, f"<mypkg/{name}.py>", "exec"), module.__dict__)
        modules[name] = module
    return modules


HELPERS = """
RATE = 0.2
def rounded(x):
    return round(x, 2)
def with_tax(x):
    return rounded(x * (1 + RATE))
class Prices:
    def total(self, rows):
        return sum(with_tax(r) for r in rows)
"""

ASSETS = """
import json
LIMIT = 10
def report(ctx, deps):
    '''Totals per day.'''
    # a comment
    return {"total": helpers.with_tax(LIMIT), "json": json.dumps([1])}
def priced(ctx, deps):
    return Prices().total([1, 2])
"""


def version(helpers: str = HELPERS, assets: str = ASSETS, name: str = "report") -> str:
    modules = package(helpers=helpers, assets=assets)
    modules["assets"].__dict__["Prices"] = modules["helpers"].Prices
    return code_version(fs.Asset(name="a", execute_fn=getattr(modules["assets"], name)))


def test_docstrings_comments_and_blank_lines_do_not_change_the_version():
    base = version()
    assert version(assets=ASSETS.replace("'''Totals per day.'''", "'''Totals per day, in euros.'''")) == base
    assert version(assets=ASSETS.replace("'''Totals per day.'''\n", "")) == base
    assert version(assets=ASSETS.replace("# a comment", "# another comment\n\n")) == base


def test_a_module_constant_the_function_reads_changes_the_version():
    assert version(assets=ASSETS.replace("LIMIT = 10", "LIMIT = 11")) != version()
    assert version(assets=ASSETS + "\nUNUSED = 1\n") == version()  # one it does not read does not


def test_a_helper_and_what_the_helper_uses_change_the_version_transitively():
    base = version()
    assert version(helpers=HELPERS.replace("x * (1 + RATE)", "x * (1 + RATE) + 0")) != base  # the helper
    assert version(helpers=HELPERS.replace("round(x, 2)", "round(x, 3)")) != base  # the helper's helper
    assert version(helpers=HELPERS.replace("RATE = 0.2", "RATE = 0.21")) != base  # a constant it reads
    assert version(helpers=HELPERS + "\ndef unrelated():\n    return 1\n") == base


def test_a_class_of_the_package_counts_by_its_methods():
    base = version(name="priced")
    assert version(helpers=HELPERS.replace("sum(with_tax(r)", "sum(2 * with_tax(r)"), name="priced") != base
    assert version(helpers=HELPERS.replace("round(x, 2)", "round(x, 4)"), name="priced") != base


def test_recursion_and_mutual_recursion_end():
    source = (
        "def a(n):\n    return b(n - 1) if n else 0\ndef b(n):\n    return a(n)\ndef f(ctx, deps):\n    return a(3)\n"
    )
    modules = package(m=source)
    assert code_version(fs.Asset(name="x", execute_fn=modules["m"].f)).startswith("code:")


def test_the_transitive_version_is_the_same_in_another_process():
    import subprocess
    import sys

    script = (
        "import sys, types\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_hashing as t\n"
        "print(t.version(), t.version(name='priced'))\n"
    )
    here = str(Path(__file__).parent)
    runs = {
        subprocess.run(
            [sys.executable, "-c", script, here], capture_output=True, text=True, check=True, timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": "", "PYTHONPATH": str(Path(fs.__file__).parent.parent)},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert runs == {f"{version()} {version(name='priced')}"}
