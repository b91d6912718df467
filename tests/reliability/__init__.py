"""Reliability tests: fuzzing, hostile clients, kill storms, crash loops, master death,
control-socket security, soak, disk and log faults (see README.md)."""
