"""tfkit: from raw text to a trained transformer language model and back to generated text."""

__version__ = "0.1.0"
