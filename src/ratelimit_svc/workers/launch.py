"""Which processes the service runs (docs/transports.md (Worker processes)): a lone pyvoy worker
is only supervised from here (servers/pyvoy.py), everything else is ``roles.run_processes``. The
App and all it serves are imported only on that second branch, so the outer process of one pyvoy
worker, which only supervises Envoy, stays small (docs/performance.md (Memory)).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from ratelimit_svc.servers import pyvoy
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.resident import release_file_pages
from ratelimit_svc.workers.supervisor import run_loop, worker_count

log = logging.getLogger(__name__)


def run(settings: Settings, env: Mapping[str, str]) -> None:
    """The service: one process, or a primary and its workers (``env`` rebuilds the settings in
    each worker, the environment being the one place settings come from)."""
    count = worker_count(settings)
    on_pyvoy = settings.grpc_server == "pyvoy"
    if on_pyvoy and (reason := pyvoy.unavailable_reason(settings)) is not None:
        log.warning("GRPC_SERVER=pyvoy: using grpcio instead: %s", reason)
        on_pyvoy = False
    if on_pyvoy and count == 1:
        code = 0

        async def supervised() -> None:
            nonlocal code
            code = await pyvoy.supervise(settings, started=release_file_pages)

        run_loop(supervised())
        if code:
            sys.exit(code)
        return
    from ratelimit_svc.workers.roles import run_processes

    run_processes(settings, env, count, on_pyvoy)
