"""Training integration: chat templates, conversation data and response-only masking."""
