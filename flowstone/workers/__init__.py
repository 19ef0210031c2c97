"""Work on other machines: ``flowstone worker`` processes over the same PostgreSQL,
fed through procrastinate (install ``flowstone[workers]``). ``Queue(dsn)``, given to
``open_runtime(queue=...)``, sends backfills there; see ``flowstone.workers.queue``.
Importing this package loads neither procrastinate nor psycopg."""

from .queue import Queue, migrate_queue, run_worker, send, send_all

__all__ = ["Queue", "migrate_queue", "run_worker", "send", "send_all"]
