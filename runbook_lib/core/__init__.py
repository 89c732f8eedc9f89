"""The bottom layer: paths, errors, secrets (masking), settings, value parsing, the async bridge, processes."""
