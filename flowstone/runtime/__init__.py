"""The actor runtime: supervisor nursery, registry, executors, runs and backfills."""
