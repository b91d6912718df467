"""The package version, in a leaf module that imports nothing.

Modules the package root imports (``cli``, ``status``, ``master``) read it from here, so
none of them imports the package root while it is still being initialised.
"""

__version__ = "0.3.0"
