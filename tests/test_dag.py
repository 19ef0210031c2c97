"""The asset graph (SPEC 2): orders, layers, cycles, transitive sets."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowstone as fs


def node(name, *deps):
    return fs.Asset(name=name, depends_on=deps, execute_fn=lambda ctx, deps: None)


DIAMOND = [node("source"), node("left", "source"), node("right", "source"), node("sink", "left", "right")]


def test_execution_order_puts_dependencies_first_and_only_what_is_needed():
    assets = [*DIAMOND, node("unrelated")]
    assert fs.execution_order("sink", assets) == ["source", "left", "right", "sink"]
    assert fs.execution_order("left", assets) == ["source", "left"]


def test_ties_follow_definition_order():
    assets = [node("b"), node("a"), node("c", "a", "b")]
    assert fs.execution_order("c", assets) == ["b", "a", "c"]


def test_layers_group_independent_assets():
    assert fs.execution_layers(DIAMOND) == [["source"], ["left", "right"], ["sink"]]
    assert fs.execution_layers(DIAMOND, target="left") == [["source"], ["left"]]


def test_dependencies_and_dependents_are_transitive():
    assert fs.dependencies("sink", DIAMOND) == {"source", "left", "right"}
    assert fs.dependents("source", DIAMOND) == {"left", "right", "sink"}
    assert fs.dependencies("source", DIAMOND) == set()


def test_functions_accept_a_pipeline():
    pipeline = fs.Pipeline("p", assets=DIAMOND)
    assert fs.execution_order("sink", pipeline)[-1] == "sink"
    fs.check_cycles(pipeline)


def test_unknown_target_is_not_found_naming_it():
    with pytest.raises(fs.NotFound, match="'nope'") as info:
        fs.execution_order("nope", DIAMOND)
    assert info.value.asset == "nope"
    with pytest.raises(fs.NotFound):
        fs.dependencies("nope", DIAMOND)


def test_unknown_dependency_in_the_plan_is_a_definition_error():
    with pytest.raises(fs.DefinitionError, match="unknown dependency 'ghost'"):
        fs.execution_order("b", [node("a"), node("b", "a", "ghost")])


def test_two_cycle_is_reported_in_dependency_order():
    with pytest.raises(fs.CycleError) as info:
        fs.check_cycles([node("a", "b"), node("b", "a")])
    assert info.value.cycle == ["a", "b"]
    assert "a -> b -> a" in str(info.value)


def test_self_loop_is_a_cycle():
    with pytest.raises(fs.CycleError) as info:
        fs.check_cycles([node("a"), node("b", "b")])
    assert info.value.cycle == ["b"]


def test_execution_order_through_a_cycle_raises_cycle_error():
    with pytest.raises(fs.CycleError):
        fs.execution_order("c", [node("a", "b"), node("b", "a"), node("c", "a")])


def test_execution_order_beside_a_cycle_still_works():
    assert fs.execution_order("c", [node("a", "b"), node("b", "a"), node("c")]) == ["c"]


def test_problems_name_every_cycle():
    graph = fs.AssetGraph([node("a", "b"), node("b", "a"), node("c", "d"), node("d", "c")])
    assert graph.cycles() == [["a", "b"], ["c", "d"]]


def test_non_asset_in_graph_is_a_definition_error():
    with pytest.raises(fs.DefinitionError, match=r"expected an fs\.Asset"):
        fs.AssetGraph([node("a"), "b"])


@st.composite
def dags(draw):
    """A random DAG: edges only go from a lower to a higher index, names shuffled."""
    size = draw(st.integers(1, 25))
    names = draw(st.permutations([f"n{i}" for i in range(size)]))
    deps = {
        names[i]: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        for i in range(size)
    }
    order = draw(st.permutations(names))  # definition order is independent of the edges
    return [node(n, *deps[n]) for n in order]


@given(dags())
def test_random_dags_respect_every_edge(assets):
    position = {n: i for i, n in enumerate(fs.execution_order(assets[-1].name, assets))}
    for asset in assets:
        for dep in asset.depends_on:
            if asset.name in position:
                assert position[dep] < position[asset.name]


@given(dags())
def test_random_dag_layers_cover_everything_once_and_respect_edges(assets):
    layers = fs.execution_layers(assets)
    layer_of = {n: i for i, layer in enumerate(layers) for n in layer}
    assert sorted(layer_of) == sorted(a.name for a in assets)
    assert sum(len(layer) for layer in layers) == len(assets)
    for asset in assets:
        for dep in asset.depends_on:
            assert layer_of[dep] < layer_of[asset.name]
    fs.check_cycles(assets)


@given(dags(), st.data())
def test_a_back_edge_makes_a_cycle_that_is_found(assets, data):
    by_name = {a.name: a for a in assets}
    # Take an edge dep -> victim and make dep depend on victim: a loop.
    with_deps = [a for a in assets if a.depends_on]
    if with_deps:
        victim = data.draw(st.sampled_from(with_deps))
        dep = by_name[data.draw(st.sampled_from(victim.depends_on))]
        closing = node(dep.name, *dep.depends_on, victim.name)
    else:
        closing = node(assets[0].name, assets[0].name)  # no edges: a self-loop
    cyclic = [closing if a.name == closing.name else a for a in assets]
    with pytest.raises(fs.CycleError) as info:
        fs.check_cycles(cyclic)
    cycle = info.value.cycle
    edges = {(d, a.name) for a in cyclic for d in a.depends_on}
    assert cycle, "a cycle must name at least one asset"
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        assert (a, b) in edges, f"{a} -> {b} is not an edge of the graph"


@given(dags(), st.data())
def test_layers_of_a_target_match_the_generations_of_its_subgraph(assets, data):
    """Precomputed depths give the same layers as computing on the subgraph."""
    import networkx as nx

    target = data.draw(st.sampled_from([a.name for a in assets]))
    names = fs.dependencies(target, assets) | {target}
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    graph.add_edges_from((d, a.name) for a in assets if a.name in names for d in a.depends_on)
    expected = [set(layer) for layer in nx.topological_generations(graph)]
    assert [set(layer) for layer in fs.execution_layers(assets, target=target)] == expected


def _maybe_a_loop(assets, data):
    """``assets``, or sometimes the same with a loop closed through two of them."""
    if data.draw(st.booleans()) and len(assets) > 1:
        first, second = data.draw(st.lists(st.sampled_from(assets), min_size=2, max_size=2, unique_by=lambda a: a.name))
        assets = [node(a.name, *a.depends_on, second.name) if a is first else
                  node(a.name, *a.depends_on, first.name) if a is second else a for a in assets]
    return assets


@given(dags(), st.data())
def test_the_order_is_networkxs_lexicographical_one_beside_any_cycle(assets, data):
    """The graph's own sort (Kahn's algorithm, ties by definition order) gives the
    order networkx's lexicographical sort gives, over what no cycle reaches; and an
    asset on or below a cycle gets no place in it."""
    import networkx as nx

    from flowstone.dag import AssetGraph

    assets = _maybe_a_loop(assets, data)
    graph = nx.DiGraph()
    graph.add_nodes_from(a.name for a in assets)
    graph.add_edges_from((d, a.name) for a in assets for d in dict.fromkeys(a.depends_on))
    on_cycle = {n for c in nx.strongly_connected_components(graph) if len(c) > 1 for n in c}
    tainted = set(on_cycle).union(*(nx.descendants(graph, n) for n in on_cycle))
    position = {a.name: i for i, a in enumerate(assets)}
    expected = list(nx.lexicographical_topological_sort(graph.subgraph(set(graph) - tainted), key=position.get))
    built = AssetGraph(assets)
    rank = built._ranks[0]
    assert sorted(rank, key=rank.__getitem__) == expected
    assert set(built._cycles[1]) == on_cycle


@given(dags(), st.data())
def test_dependencies_and_dependents_are_networkxs_ancestors_and_descendants(assets, data):
    """The graph walks its edges itself; what it finds is what networkx finds, on a
    graph with a cycle too (an asset on a cycle is not its own dependency)."""
    import networkx as nx

    from flowstone.dag import AssetGraph

    assets = _maybe_a_loop(assets, data)
    graph = nx.DiGraph()
    graph.add_nodes_from(a.name for a in assets)
    graph.add_edges_from((d, a.name) for a in assets for d in a.depends_on)
    built = AssetGraph(assets)
    for name in graph:
        assert built.dependencies(name) == nx.ancestors(graph, name)
        assert built.dependents(name) == nx.descendants(graph, name)


def test_layers_beside_a_cycle_still_work():
    assets = [node("a", "b"), node("b", "a"), node("c"), node("d", "c")]
    assert fs.execution_layers(assets, target="d") == [["c"], ["d"]]
    with pytest.raises(fs.CycleError):
        fs.execution_layers(assets)


# ------------------------------------------------------------- growing a graph


def _answers(graph):
    names = [a.name for a in graph.assets]
    return (
        names,
        {n: graph.execution_order(n) for n in names},
        graph.layers(),
        {n: graph.dependents(n) for n in names},
        {n: graph.has_readers(n) for n in names},
        graph.problems(),
    )


@given(st.lists(st.lists(st.integers(0, 40), max_size=4), min_size=1, max_size=40))
def test_a_graph_grown_one_asset_at_a_time_answers_as_one_built_at_once(picks):
    assets = [node(f"a{i}", *sorted({f"a{j % i}" for j in deps}) if i else ()) for i, deps in enumerate(picks)]
    grown = fs.AssetGraph([])
    snapshots = []
    for asset in assets:
        grown = grown.with_asset(asset)
        snapshots.append((grown, _answers(fs.AssetGraph(assets[: len(snapshots) + 1]))))
    assert _answers(grown) == _answers(fs.AssetGraph(assets))
    for snapshot, answers in snapshots:  # every older graph still answers as it did
        assert _answers(snapshot) == answers


def test_growing_an_older_graph_or_with_a_problem_builds_a_new_one():
    base = fs.AssetGraph(DIAMOND)
    first = base.with_asset(node("report", "sink"))
    other = base.with_asset(node("audit", "left"))  # base is no longer the newest: built afresh
    assert "report" not in other and "audit" not in first and base.dependents("left") == {"sink"}
    assert not base.has_readers("sink") and first.has_readers("sink")
    unknown = first.with_asset(node("x", "nowhere"))
    assert [e.message for e in unknown.problems()] == ["unknown dependency 'nowhere'"]
    looped = first.with_asset(node("self", "self"))
    assert looped.cycles() == [["self"]]
    assert first.with_asset(node("after", "report")).execution_order("after")[-2:] == ["report", "after"]
