"""The two anyio backends every async test runs under.

"asyncio" names its loop explicitly. Once a trio test reaches PostgreSQL, FlowStone
imports trio-asyncio, which replaces asyncio's default loop policy with its own: from
then on a plain ``asyncio.new_event_loop()`` is trio-asyncio's ``SyncTrioEventLoop``,
a trio run underneath. Without the factory, every "asyncio" test after that point
would be testing trio-asyncio instead of asyncio (and trio's deadline heap would show
up in tests that count objects).
"""

import asyncio

import pytest

ASYNCIO = pytest.param(("asyncio", {"loop_factory": asyncio.SelectorEventLoop}), id="asyncio")
TRIO = pytest.param("trio", id="trio")
