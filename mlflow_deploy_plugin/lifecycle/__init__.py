"""The lifecycle path: follow the registry, policies, webhooks, transitions."""
