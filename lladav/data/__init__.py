"""Data: corpus readers, the chat template, image checks, the mixture build and the training loader."""
