"""The documentation's examples, run."""
