"""A worker process: the loops (one thread or several), the request core around the WSGI
app, accepting, the hand-off of kept connections, the app's import, its output pipe.

It imports ``wire`` and the shared floor, never the master or the command line.
"""
