"""Work on other machines: ``flowstone worker`` processes over the same PostgreSQL,
fed through procrastinate (install ``flowstone[workers]``). See ``flowstone.workers.queue``.
Importing this package loads neither procrastinate nor psycopg."""
