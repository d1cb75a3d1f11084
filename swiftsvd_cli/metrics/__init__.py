"""What `eval` measures: perplexity, zero-shot accuracy, size and speed."""
