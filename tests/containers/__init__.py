"""Container tests: fcgi-manager as PID 1 of its own PID namespace, orphans reaped, the
shutdown_delay drain, the Dockerfile run as written, the Kubernetes manifests validated,
and a pod's rollout simulated with real processes."""
