"""Models: the LLaDA LM (llada.py), LLaDA-V around it (lladav.py), named configs (flavors.py).

The models return logits (or, for training, hidden states and the head's cross-entropy on the
rows asked for, head.py): masking, the loss and sampling live in diffusion.py and sampler.py,
distribution in train/engine.py. Importing this package imports nothing; importing
lladav.model.llada registers "llada" with transformers' AutoConfig/AutoModel.
"""
