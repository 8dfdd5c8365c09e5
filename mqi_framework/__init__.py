"""MQI host: a plugin-based conductor for the Moqui dose-QA pipeline.

Plugin authors import the markers from here::

    from mqi_framework import hookimpl

Importing this package is cheap: nothing here loads plugins or heavy libraries.

What a plugin (first-party or a site's) may import from the core is :data:`PUBLIC_MODULES`;
everything else is internal and may change without notice (a test keeps the plugins and
examples of this repository to that surface; ``docs/architecture.md`` draws it).
"""

import pluggy

PROJECT_NAME = "mqi"
ENTRY_POINT_GROUP = "mqi_framework.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__version__ = "0.1.0"

#: the core modules plugins may import: markers (this package), the host's operations
#: (``api``), the base classes and data types (``protocols``), the hook specifications
#: (``hookspecs``), helpers for implementations (``toolkit``) and the pytest fixtures
#: (``testing``)
PUBLIC_MODULES = (
    "mqi_framework",
    "mqi_framework.api",
    "mqi_framework.protocols",
    "mqi_framework.hookspecs",
    "mqi_framework.toolkit",
    "mqi_framework.testing",
)

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME", "ENTRY_POINT_GROUP", "PUBLIC_MODULES", "__version__"]
