"""Training integration: chat templates and data helpers (and, on other branches, trainer glue)."""
