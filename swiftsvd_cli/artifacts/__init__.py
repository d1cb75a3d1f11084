"""On-disk artifacts: the atomic, checksummed store and one module per artifact format."""
