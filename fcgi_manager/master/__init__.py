"""The master: its shell (one selector over the workers, the pipes and the control socket),
forking the workers and the zygote, reload and resume, the daemon and pidfile, systemd,
the registry of running masters, the pool directory's parent.

It drives ``rules`` and forks ``worker``; ``lifecycle.serve`` is where the command line
and the library API (``WSGIServer``) both start one.
"""
