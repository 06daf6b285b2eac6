"""The one error of every checkpoint loader (language model, speech tokenizer, decoder).

Torch-free, so the config readers of lmtext import it too; callers catch one class for any folder.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""
