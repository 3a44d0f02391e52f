"""fa-rules: composable credit-assignment rules on one torch.func engine."""

__version__ = "0.1.0"
