"""What steps write and read: step results, their typed outputs, the run's manifest, the secret scan."""
