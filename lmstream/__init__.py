"""LLaVA-Mini Stream: command line and shared error types."""
