"""ml_collections configs: the paper default, the baseline and CPU-sized variants."""
