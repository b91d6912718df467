"""Deployment tests: every front end and supervisor of Flask's FastCGI guide, for real.

Each test renders the shipped files under ``examples/`` into a temporary directory
(substituting only paths, ports and users), starts the real programs on loopback or unix
sockets, and sends requests through them to the guide's Flask app served by fcgi-manager.
"""
