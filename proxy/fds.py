"""The process's open-file limit, raised to what the system allows before serving.

Why: every client connection is a file descriptor, and a proxied one holds a second, upstream. Many systems
start processes with a soft limit of 1,024 under a much higher hard one (systemd: 1,024 / 524,288), so a
gateway left at the soft limit refuses its 500th concurrent stream with EMFILE while the system would allow
a thousand times more. Go's runtime raises it for every program for the same reason; nginx asks for it in
its config (`worker_rlimit_nofile`). Raising the soft limit up to the hard one needs no privilege.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("hedgerow")

_UNBOUNDED_TARGET = 1 << 20  # a hard limit of "unlimited" (macOS): ask for this much
FDS_PER_CONNECTION = 2  # the client's socket and the upstream's
SPARE_FDS = 64  # listeners, the loop's epoll, logs, the ledger's database, health probes


def raise_open_files_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one; warn when even that cannot hold `max_connections`
    proxied connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _UNBOUNDED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:  # a platform cap below the hard limit (macOS: OPEN_MAX)
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, e)
    need = FDS_PER_CONNECTION * max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open-file limit %d holds about %d proxied connections, fewer than server.max-connections (%d): "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=, the container's nofile) or lower max-connections",
            soft,
            (soft - SPARE_FDS) // FDS_PER_CONNECTION,
            max_connections,
        )
