"""The sandbox: every external service of the production pipeline, replaced on loopback by a real
process speaking the real protocol. One module per emulated service; `manager` runs them."""
