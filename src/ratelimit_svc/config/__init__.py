"""Rate-limit configuration: the rule model, the YAML loader, where files come from, the file
watcher and the xDS client (docs/configuration.md)."""
