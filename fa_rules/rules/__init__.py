"""Built-in credit-assignment rules, one module per rule family, each a pluggy plugin."""
