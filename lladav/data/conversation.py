"""LLaDA-V's chat templates and tokenization: token ids, the target mask, the image placeholder.

Owns: turning a LLaVA conversation into the exact id sequence and target mask of the reference
(lladav_reference.md, "Tokens and template" and "Labels"): the `llava_llada` template of stages 2-3,
the `llada_plain` template of stage 1, the inference prompt, the per-source tags, and the text
identity used for dedup. Does not own: images (data/images.py), padding and batching
(data/loader.py), or masking for the diffusion loss (diffusion.py).

Special token ids are looked up by name in the tokenizer a recipe names, never hard-coded.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lladav.data import RecordError

# Special tokens of LLaDA-8B-Instruct's tokenizer (lladav_reference.md, "Tokens and template").
# Ids are looked up by name in whatever tokenizer a recipe names, never hard-coded: the real
# tokenizer gives 126080/126081/126336/126346/126347/126348, the tiny test tokenizer its own.
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"          # also the pad token
MASK = "<|mdm_mask|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<image>"              # text placeholder; becomes IMAGE_PLACEHOLDER_ID in token ids
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT, IMAGE]
IMAGE_PLACEHOLDER_ID = -200    # LLaVA's IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100
# What a position of `Tokenized.targets` (and of a shard's targets.npy) holds:
NOT_TARGET = 0                 # prompt text, image placeholders
TEMPLATE_TARGET = 1            # a target that is template: BOS/headers/EOT anywhere, role words
ANSWER_TARGET = 2              # a target inside the assistant's own words (the answer metrics)


SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
# LLaVA's speaker names -> LLaDA chat roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


class ConversationError(RecordError):
    """A record's conversation cannot be templated; `code` is the reject reason."""


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Tokenized:
    """One templated sample. `ids` holds IMAGE_PLACEHOLDER_ID where image features go;
    `targets[i]` is non-zero where position i is a training target (lladav_reference.md,
    "Labels"): ANSWER_TARGET inside the assistant's own text, TEMPLATE_TARGET for the rest
    (structural tokens, role words, the blank line after a header). Both train alike; the
    distinction only feeds the answer-only loss and accuracy a stage reports."""

    ids: np.ndarray      # (L,) int32
    targets: np.ndarray  # (L,) uint8: NOT_TARGET | TEMPLATE_TARGET | ANSWER_TARGET

    @property
    def n_placeholders(self) -> int:
        return int((self.ids == IMAGE_PLACEHOLDER_ID).sum())

    @property
    def n_text_tokens(self) -> int:
        return int(len(self.ids)) - self.n_placeholders

    @property
    def n_targets(self) -> int:
        return int((self.targets != NOT_TARGET).sum())

    @property
    def n_answer_tokens(self) -> int:
        return int((self.targets == ANSWER_TARGET).sum())

    def labels(self) -> np.ndarray:
        """Labels in the reference's convention: the id where targeted, IGNORE_INDEX elsewhere."""
        return np.where(self.targets != NOT_TARGET, self.ids, IGNORE_INDEX).astype(np.int64)


# Lone surrogates ("\\ud800" in JSON) are valid JSON but not Unicode: no tokenizer or UTF-8
# writer accepts them, so the record is rejected here rather than failing deep in a worker.
_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize_turns(conversations: Any, n_images: int) -> list[Turn]:
    """LLaVA `conversations` -> checked turns, as the reference prepares them.

    Drops leading assistant turns, maps speaker names, moves a lone `<image>` to the front of
    its turn (`"<image>\\n" + rest`), and adds placeholders to the first user turn when a record
    has images but none in its text. Raises ConversationError with the reject reason.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("malformed_record", "`conversations` must be a non-empty list")
    turns: list[Turn] = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise ConversationError("malformed_record", f"conversations[{i}] needs a string `value`")
        role = ROLES.get(str(msg.get("from", "")).lower())
        if role is None:
            raise ConversationError("malformed_record",
                                    f"conversations[{i}].from={msg.get('from')!r} is not a known speaker")
        text = msg["value"]
        if surrogate := _SURROGATE.search(text):
            at = surrogate.start()
            raise ConversationError("invalid_text", f"conversations[{i}].value holds a lone UTF-16 "
                                    f"surrogate {text[at]!r} at character {at} (not valid Unicode)")
        turns.append(Turn(role, text))
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    if not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise ConversationError("no_assistant_turn", "the conversation has no assistant answer")
    turns = [_move_lone_placeholder(t) for t in turns]
    n_marks = sum(t.text.count(IMAGE) for t in turns)
    if n_marks == 0 and n_images:
        first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
        if first_user is None:
            raise ConversationError("malformed_record", "images but no user turn to attach them to")
        t = turns[first_user]
        turns[first_user] = Turn(t.role, " ".join([IMAGE] * n_images) + "\n" + t.text)
        n_marks = n_images
    if n_marks != n_images:
        raise ConversationError("image_count_mismatch",
                                f"{n_marks} {IMAGE} placeholders but {n_images} images")
    return turns


def _move_lone_placeholder(turn: Turn) -> Turn:
    if turn.text.count(IMAGE) == 1 and not turn.text.startswith(IMAGE):
        return Turn(turn.role, IMAGE + "\n" + turn.text.replace(IMAGE, "").strip())
    return turn


def add_tag(turns: list[Turn], tag: str, draws: Sequence[bool]) -> list[Turn]:
    """Append `" " + tag` to user turn k when draws[k] (one draw per user turn)."""
    out, k = [], 0
    for t in turns:
        if t.role == "user":
            if draws[k]:
                t = Turn(t.role, f"{t.text} {tag}")
            k += 1
        out.append(t)
    return out


_WS = re.compile(r"\s+")


def normalized_text(turns: list[Turn]) -> str:
    """The text identity used for exact dedup: NFKC, case-folded, whitespace collapsed, with roles."""
    return "\n".join(f"{t.role}: {_WS.sub(' ', unicodedata.normalize('NFKC', t.text)).strip().casefold()}"
                     for t in turns)


_PUNCT = re.compile(r"[^\w\s]")


def question_key(text: str) -> str:
    """The identity of a question for contamination checks: 16 hex digits of the sha256 of its
    text with `<image>` tags and punctuation removed, NFKC, case-folded, whitespace collapsed
    ("What colour is it?" and "what colour is it" are one question)."""
    plain = unicodedata.normalize("NFKC", text.replace(IMAGE, " ")).casefold()
    plain = _WS.sub(" ", _PUNCT.sub(" ", plain)).strip()
    return hashlib.sha256(plain.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def question_keys(turns: list[Turn]) -> list[str]:
    """`question_key` of each user turn, in order."""
    return [question_key(t.text) for t in turns if t.role == "user"]


class ChatTokenizer:
    """A Hugging Face tokenizer plus the LLaDA special ids, looked up by name.

    `<image>` is added to a copy of the tokenizer when absent (as the reference does) and its id
    is replaced by IMAGE_PLACEHOLDER_ID, so it never reaches the stored ids.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS
                   if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"tokenizer lacks the LLaDA special tokens {missing}")
        ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.mask_id = ids[BOS], ids[EOS], ids[MASK]
        self.sh_id, self.eh_id, self.eot_id, self.image_id = (
            ids[START_HEADER], ids[END_HEADER], ids[EOT], ids[IMAGE])
        # Template tokens that are targets wherever they stand, prompt turns included.
        self.structural_ids = np.array([self.bos_id, self.sh_id, self.eh_id, self.eot_id])

    @classmethod
    def from_folder(cls, path: str | Path) -> "ChatTokenizer":
        """A tokenizer folder on local disk (data/tokenizer.load_tokenizer takes any URI and
        caches per process)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    def special_ids(self) -> dict[str, int]:
        return {"bos": self.bos_id, "eos": self.eos_id, "mask": self.mask_id, "start_header":
                self.sh_id, "end_header": self.eh_id, "eot": self.eot_id,
                "image_placeholder": IMAGE_PLACEHOLDER_ID}

    def encode(self, text: str) -> np.ndarray:
        """Tokenize without added BOS/EOS; `<image>` becomes IMAGE_PLACEHOLDER_ID."""
        return self.encode_spans(text)[0]

    def encode_spans(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """`encode` plus each token's (start, end) character span in `text`: (L,), (L, 2)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A fast tokenizer's own encode (what its __call__ runs, with the same added tokens):
            # transformers' wrapper around it was 60% of a text record's build time.
            enc = backend.encode(text, add_special_tokens=False)
            ids_list, offsets = enc.ids, enc.offsets
        else:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids_list, offsets = out["input_ids"], out["offset_mapping"]
        ids = np.asarray(ids_list, dtype=np.int32)
        ids[ids == self.image_id] = IMAGE_PLACEHOLDER_ID
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        return ids, spans

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if i >= 0], skip_special_tokens=False)


def _header(role: str) -> str:
    return f"{BOS}{START_HEADER}{role}{END_HEADER}\n\n"


def _answer_codes(ids: np.ndarray, spans: np.ndarray, start: int, end: int) -> np.ndarray:
    """ANSWER_TARGET for the tokens whose characters overlap text[start:end] (the assistant's
    own words: the template is tokenized whole, as the reference does, so a token may straddle
    the boundary), TEMPLATE_TARGET for the others."""
    inside = (spans[:, 0] < end) & (spans[:, 1] > start) & (ids >= 0)
    return np.where(inside, ANSWER_TARGET, TEMPLATE_TARGET).astype(np.uint8)


def tokenize_llava_llada(turns: list[Turn], tok: ChatTokenizer) -> Tokenized:
    """The stage 2-3 template: system message, then every turn with its BOS dropped.

    Targets: all tokens of assistant messages (their text: ANSWER_TARGET), plus BOS/SH/EH/EOT
    wherever they stand.
    """
    pieces, targets = [], []
    messages = [Turn("system", SYSTEM_PROMPT)] + [t for t in turns if t.role != "system"]
    for i, turn in enumerate(messages):
        header = _header(turn.role)
        ids, spans = tok.encode_spans(f"{header}{turn.text}{EOT}")
        if turn.role == "assistant":
            codes = _answer_codes(ids, spans, len(header), len(header) + len(turn.text))
        else:
            codes = np.where((ids[:, None] == tok.structural_ids).any(axis=1), TEMPLATE_TARGET,
                             NOT_TARGET).astype(np.uint8)
        if i > 0:  # the reference drops the BOS of every message after the first
            ids, codes = ids[1:], codes[1:]
        pieces.append(ids)
        targets.append(codes)
    return Tokenized(np.concatenate(pieces).astype(np.int32), np.concatenate(targets))


def tokenize_llada_plain(turns: list[Turn], tok: ChatTokenizer) -> Tokenized:
    """The stage 1 template: `<image>` + first answer + "\\n"; the user text is discarded.

    Targets: every position but the placeholder (the caption's own tokens: ANSWER_TARGET).
    """
    caption = next(t.text for t in turns if t.role == "assistant")
    text_ids, spans = tok.encode_spans(caption + "\n")
    ids = np.concatenate([np.array([IMAGE_PLACEHOLDER_ID], dtype=np.int32), text_ids])
    targets = np.concatenate([np.zeros(1, dtype=np.uint8),
                              _answer_codes(text_ids, spans, 0, len(caption))])
    return Tokenized(ids.astype(np.int32), targets)


def tokenize(turns: list[Turn], tok: ChatTokenizer, template: str) -> Tokenized:
    if template == "llava_llada":
        return tokenize_llava_llada(turns, tok)
    if template == "llada_plain":
        n_marks = sum(t.text.count(IMAGE) for t in turns)
        if n_marks != 1:
            raise ConversationError("template_mismatch",
                                    f"llada_plain needs exactly one image, the record has {n_marks}")
        return tokenize_llada_plain(turns, tok)
    raise ValueError(f"unknown template {template!r}; expected llava_llada or llada_plain")


def prompt_ids(conversation: str | list[dict[str, Any]], tok: ChatTokenizer, n_images: int = 1,
               tag: str | None = None) -> np.ndarray:
    """Inference prompt: system + the conversation so far, ending with the assistant header and
    "\\n\\n". `conversation` is one question, or LLaVA messages ending with the user turn to
    answer (earlier answers stay as context). `tag` is appended to every user turn, as a recipe
    source's `tag` was in training."""
    messages = ([{"from": "human", "value": conversation}] if isinstance(conversation, str)
                else list(conversation))
    # normalize_turns wants an answer to exist; the stand-in is dropped again below.
    turns = normalize_turns(messages + [{"from": "gpt", "value": "-"}], n_images)[:-1]
    if tag:
        turns = add_tag(turns, tag, [True] * sum(t.role == "user" for t in turns))
    body = tokenize_llava_llada(turns, tok).ids
    header = tok.encode(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return np.concatenate([body, header]).astype(np.int32)
