"""lladav: LLaDA-V training, end to end.

Importing the package pulls in nothing heavy (no torch, ray or mlflow), so the CLI starts fast and
importing has no side effects. The version is the single source for lineage's "code version".
"""

__version__ = "0.1.0"
