"""Example pipelines shipped with FlowStone (``flowstone.examples.flights``: NYC flights, 2013)."""
