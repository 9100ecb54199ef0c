"""Tiny stand-ins for what the paper downloads, for CPU runs: the synthetic shapes corpus of the
demo (shapes.py) and tiny base checkpoints pretrained on any corpus's image-text pairs (base.py).

Nothing on the 8B path imports this package: a real run starts from LLaDA-8B-Instruct and
SigLIP2 checkpoints and a real tokenizer.
"""
