"""The rules of supervision, pure: events in, actions out, no system call.

The supervisor, the restart and crash-loop rules, the pool sizing, the pool directory's
rules. They import only ``wire``, so they run under unit tests as they run in the master.
"""
