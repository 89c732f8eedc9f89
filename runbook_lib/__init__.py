"""runbook_lib: the logic behind the deployment runbook's notebooks."""
