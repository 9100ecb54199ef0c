"""Tokenizers: training one for any corpus, loading one from a URI, and its identity.

    corpus (recipe sources or files) --corpus_texts--> texts --train_tokenizer--> folder
    folder or s3:// URI --load_tokenizer--> ChatTokenizer (cached per process)
    folder or s3:// URI --tokenizer_digest--> sha256 recorded in mixture.json
    (uri, recorded digest) --checked_tokenizer--> ChatTokenizer, or TokenizerMismatch naming both

A real run uses LLaDA-8B-Instruct's tokenizer as it is. A tiny model on one's own corpus needs a
small one that still speaks LLaDA's template: `train_tokenizer` makes a byte-level BPE whose
first ids are the LLaDA special tokens (they never split), trained on the corpus's texts plus the
template's own words (system prompt, role names, the /think tags), so ordinary answer words get
tokens of their own instead of byte pieces. `lladav tokenizer train` and the pipeline's
`tokenizer` step call it.

Owns: training, loading and digesting tokenizer folders. Does not own: the template or the
special ids' meaning (data/conversation.py), reading corpora (data/sources.py).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from lladav import storage
from lladav.config import Source
from lladav.data.conversation import (BOS, EOS, MASK, SPECIAL_TOKENS, SYSTEM_PROMPT,
                                      ChatTokenizer)
from lladav.digest import digest_obj, sha256_bytes

TEMPLATE_WORDS = ["system", "user", "assistant", " /think", " /no_think"]
"""Words the template and the paper's tags add to every sample, whatever the corpus says."""


def template_texts(tags: Iterable[str] = ()) -> list[str]:
    """The texts every tokenizer is trained on besides its corpus: the system prompt, the role
    names, the /think tags and any other tag a recipe appends (with its leading space)."""
    return [SYSTEM_PROMPT, *TEMPLATE_WORDS, *(f" {t}" for t in tags if f" {t}" not in TEMPLATE_WORDS)]


def corpus_texts(sources: Sequence[Source], max_records: int | None = None) -> Iterator[str]:
    """Every message text of the sources' records (images are not read), then template_texts
    with their tags. Records that cannot be read are skipped: a build will reject them anyway.
    `max_records` caps the records read per source (a tokenizer needs a sample, not 10M)."""
    from lladav.data.sources import BadRecord, Unreadable, enumerate_source, load_record

    for source in sources:
        n = 0
        for ref in enumerate_source(source):
            if isinstance(ref, Unreadable):
                continue
            if max_records is not None and n >= max_records:
                break
            try:
                record = load_record(source, ref, with_images=False)
            except BadRecord:
                continue
            n += 1
            for message in record.conversations if isinstance(record.conversations, list) else []:
                if isinstance(message, dict) and isinstance(message.get("value"), str):
                    yield message["value"]
    yield from template_texts(s.tag for s in sources if s.tag)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on texts and save it as a LLaDA-like PreTrainedTokenizerFast.

    The special tokens take ids 0-6 and never split; the tokenizer adds no BOS/EOS (as LLaDA's);
    decoding gives back the exact bytes. vocab_size counts the special tokens and the 256 bytes.
    Uses Hugging Face `tokenizers`' trainer; the same texts give the same files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} < {256 + len(SPECIAL_TOKENS)} "
                         "(256 byte tokens + the special tokens)")
    # Special tokens are cut out of the training text so no merge ever spans them.
    splitter = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [p for text in texts for p in splitter.split(text) if p]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=1, show_progress=False)
    backend.train_from_iterator(pieces, trainer)
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, MASK)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK,
        additional_special_tokens=extra, clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_to_uri(texts: Iterable[str], uri: str, *, vocab_size: int = 1024) -> str:
    """train_tokenizer, published whole at a local or s3:// URI (storage.publish_folder)."""
    with tempfile.TemporaryDirectory(prefix="lladav-tokenizer-") as tmp:
        folder = train_tokenizer(texts, Path(tmp) / "tokenizer", vocab_size=vocab_size)
        storage.publish_folder(folder, uri, last="tokenizer_config.json")
    return uri


@lru_cache(maxsize=4)
def load_tokenizer(uri: str) -> ChatTokenizer:
    """The tokenizer folder at `uri` (local or s3://), loaded once per process. An S3 folder is
    downloaded to a temporary folder that is gone again on return: the fast tokenizer keeps
    everything it read in memory."""
    from transformers import AutoTokenizer

    with storage.local_folder(uri) as folder:
        return ChatTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


class TokenizerMismatch(ValueError):
    """The tokenizer at a URI is not the one a mixture was tokenized with (its digest changed)."""


def checked_tokenizer(uri: str, digest: str, what: str) -> ChatTokenizer:
    """load_tokenizer(uri), after checking that the folder still has `digest` (the one `what`,
    e.g. a mixture, recorded): a tokenizer retrained or replaced in place would turn every id
    of the mixture into another word, silently."""
    found = tokenizer_digest(uri)
    if found != digest:
        raise TokenizerMismatch(
            f"{what} was tokenized with the tokenizer at {uri}, digest {digest}, but that folder "
            f"now has digest {found}: it was changed after the build. Rebuild the mixture with "
            "this tokenizer, or put the original back")
    return load_tokenizer(uri)


def tokenizer_digest(uri: str) -> str:
    """sha256 over the folder's files (relative name -> sha256), hidden files excluded."""
    uris = [u for u in storage.list_uris(uri) if not storage.basename(u).startswith(".")]
    if not uris:
        raise FileNotFoundError(f"tokenizer: {uri} does not exist or is empty")
    return digest_obj({u[len(uri):].lstrip("/"): sha256_bytes(storage.read_bytes(u)) for u in uris})
