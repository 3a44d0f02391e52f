"""The pluggy markers. Plugins (built-in or third-party) decorate hook functions with `hookimpl`."""

import pluggy

PROJECT = "fa_rules"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
