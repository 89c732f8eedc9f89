"""One module per runbook step; steps never import each other and hand results on as typed outputs."""
