"""Tools for testing pipelines built on FlowStone.

- ``ConcurrentHarness``: run an operation many times at once; latency percentiles
  and errors by type.
- Chaos: ``kill_actor``, ``ActorKiller``, ``FaultyIO``, ``terminate_connections``.
- ``check_integrity``: after a run full of faults, every record terminal, one
  success per partition, every success's value present.
- ``assert_performance``: wall time and peak traced memory against limits.
- ``TemporaryPostgres`` (``flowstone.testing.postgres``): a throwaway server.
- The ``flowstone_runtime`` pytest fixture (``flowstone.testing.pytest_plugin``,
  registered automatically): an isolated runtime per test.
"""

from .chaos import ActorKiller as ActorKiller
from .chaos import FaultyIO as FaultyIO
from .chaos import InjectedFault as InjectedFault
from .chaos import kill_actor as kill_actor
from .chaos import terminate_connections as terminate_connections
from .clock import ManualClock as ManualClock
from .harness import ConcurrentHarness as ConcurrentHarness
from .harness import HarnessReport as HarnessReport
from .harness import Latency as Latency
from .harness import Metrics as Metrics
from .integrity import IntegrityError as IntegrityError
from .integrity import IntegrityReport as IntegrityReport
from .integrity import check_integrity as check_integrity
from .performance import Measurement as Measurement
from .performance import PerformanceError as PerformanceError
from .performance import assert_performance as assert_performance
