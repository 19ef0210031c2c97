"""FlowStone's benchmarks and stress scenarios: ``python -m stress list``."""
