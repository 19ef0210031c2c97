"""PostgreSQL plumbing shared by the store and PostgresIO: the asyncio bridge, the pool, the schema."""
