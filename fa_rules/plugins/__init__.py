"""The extension machinery: hookspecs, the plugin manager, built-in dataset and model plugins."""
