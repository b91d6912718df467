"""What a worker and the master both know by number: exit codes and signals.

The worker exits with one of the ``EXIT_*`` codes to tell the master why it ended; the
master sends ``STACK_SIGNAL`` to a worker stuck in a request, so it writes every thread's
stack to the log before the ``SIGKILL``, and ``WAKE_SIGNAL`` to an idle worker so it looks
at its log epoch at once. This module imports nothing of the package: the pure rules
(``supervisor``, ``restarts``) read these numbers without loading the worker side.
"""

from __future__ import annotations

import signal

EXIT_OK = 0  # asked to stop (stop, reload, scale down, master gone)
EXIT_BOOT_ERROR = 3  # the app could not be imported: the master must not respawn in a loop
EXIT_RECYCLE_REQUESTS = 10  # served max_requests
EXIT_RECYCLE_MEMORY = 11  # RSS passed max_memory

STACK_SIGNAL = signal.SIGUSR2  # dump every thread's stack (faulthandler), then go on
WAKE_SIGNAL = signal.SIGUSR1  # an idle worker wakes from epoll and reopens its access log
