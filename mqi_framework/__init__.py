"""MQI host: a plugin-based conductor for the Moqui dose-QA pipeline.

Plugin authors import the markers from here::

    from mqi_framework import hookimpl

Importing this package is cheap: nothing here loads plugins or heavy libraries.
"""

import pluggy

PROJECT_NAME = "mqi"
ENTRY_POINT_GROUP = "mqi_framework.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__version__ = "0.1.0"

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME", "ENTRY_POINT_GROUP", "__version__"]
