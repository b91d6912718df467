"""What both sides of a pipe or socket agree on: FastCGI records, the notify frames, the
control socket's framing, the exit codes and signals, the worker states.

The bottom layer: it imports only the package's leaves (errors). README, "Design".
"""
