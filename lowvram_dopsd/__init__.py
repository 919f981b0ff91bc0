"""lowvram-dopsd: D-OPSD LoRA training for step-distilled text-to-image models on one 16-24 GB GPU."""

__version__ = "0.1.0"
