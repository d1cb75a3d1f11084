"""Text sources for calibration, validation and perplexity, and the bundled demo assets."""
