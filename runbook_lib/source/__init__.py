"""Analysis of the flow's source, read from its syntax tree (never imported), and of its packages."""
