"""patchrec: LLM sequential recommendation with compressed long user histories."""

__version__ = "0.1.0"
