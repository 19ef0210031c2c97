"""What an asset function sees about the run it is part of."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from .definitions import Asset

__all__ = ["Context"]


@attrs.frozen(weakref_slot=False)  # built by a builder (see flowstone.plumbing.frozen)
class Context:
    """The ``ctx`` argument of an asset function.

    Built by the runtime for each materialization. ``metadata`` is the one
    mutable part: the function may fill it, and it is saved on the record.
    """

    asset: Asset
    partition: Any
    partition_key: str | None
    run_id: uuid.UUID
    tenant: str | None
    log: logging.Logger
    resources: Mapping[str, Any] = attrs.field(factory=dict)
    metadata: dict[str, Any] = attrs.field(factory=dict)
