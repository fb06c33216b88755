"""Moving models between tfkit and other tools (Hugging Face folders: :mod:`tfkit.interop.hf`)."""
