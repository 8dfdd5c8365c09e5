"""Shared fixtures: the plugin-author fixtures come from mqi_framework.testing (pytest11)."""

import os
import sys

# Tests never pick up a site's MQI_* switches by accident.
for _name in ("MQI_LOAD_PLUGINS", "MQI_DISABLE_PLUGINS", "MQI_STRICT_PLUGINS", "MQI_TRACE_HOOKS", "MQI_CONFIG"):
    os.environ.pop(_name, None)

sys._called_from_test = True  # type: ignore[attr-defined]
