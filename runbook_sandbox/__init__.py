"""The sandbox: every external service of the production pipeline, replaced on loopback by a real
process speaking the real protocol. One module per emulated service; `manager` runs them."""

from runbook_lib.core.startup import without_httpx_cli

# Every service process starts as `python -m runbook_sandbox.<module>`, which imports this package before
# its module: none of them runs httpx's command line, which `import httpx` would otherwise load (click,
# rich and pygments; ~6 MiB resident and ~75 ms of CPU in each stand-in that speaks HTTP with httpx).
without_httpx_cli()
