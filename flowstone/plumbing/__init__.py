"""Shared plumbing below every adapter: the asyncio bridge for trio callers, strict
JSON, the clock, and the ``async with`` base of closeable managers. Imports nothing
of FlowStone's but its errors."""
