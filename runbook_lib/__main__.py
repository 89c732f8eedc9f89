from runbook_lib.cli import app

app()
