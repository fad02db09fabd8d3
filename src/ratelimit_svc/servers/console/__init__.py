"""The operator's console on the debug port (docs/console.md): its data and its page."""
