"""Tools for testing pipelines built on FlowStone (SPEC 9)."""
