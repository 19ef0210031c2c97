"""Contract suites: one behaviour, every implementation (memory, embedded, Postgres)."""
