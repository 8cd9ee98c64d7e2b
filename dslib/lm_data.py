"""Real text for the assembled model: the Python standard library's own source, a BPE tokenizer, token classes,
distances to earlier context, and fixed-length batches (chapter 5).

Every learner's machine has this corpus: the `.py` files of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`). Nothing is downloaded.

    files = corpus_files()                      # sorted relative paths (test suites, generated tables, GUIs skipped)
    split = split_files(files)                  # {"train": [...], "eval": [...]}: ~5% of files by a hash of the path
    tok = train_tokenizer(texts(split["train"]))   # byte-level BPE (Hugging Face `tokenizers`), saved as tokenizer.json
    ids, classes = encode_with_classes(tok, text)  # BPE ids and each token's Python token class (`tokenize`)
    distance_to_previous(ids)                   # how far back the previous occurrence of the same token is

Byte-level BPE starts from the 256 byte values, so it encodes *any* UTF-8 text: a character it never saw in training
(an emoji, Chinese, a rare accent) becomes its UTF-8 bytes, one token per byte or merged pair; nothing is replaced
by an "unknown" token, and decoding gives the text back exactly.

Token classes come from Python's own tokenizer (`tokenize`): keyword, identifier, whitespace (indentation, newlines,
spaces), string (docstrings included), number, operator, comment, other (what `tokenize` cannot place, and the
end-of-file token). A BPE token takes the class of its first non-space character; a BPE token of spaces and
newlines only is whitespace, unless it lies inside a string or a comment.
"""
from __future__ import annotations

import hashlib
import io
import keyword
import sys
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

EOT = "<|endoftext|>"  # separates files in the token stream (id 0)
EVAL_SHARE = 20  # a file is held out when hash(path) % EVAL_SHARE == 0: ~5% of the files

TOKEN_CLASSES = ("keyword", "identifier", "whitespace", "string", "number", "operator", "comment", "other")
CLASS_ID = {name: i for i, name in enumerate(TOKEN_CLASSES)}

# Top-level folders of the stdlib that are not library source written by people for people: installed third-party
# packages, generated tables (encodings' code pages, pydoc's topic texts), demos and applications, and a package
# removed in later Pythons (lib2to3), so the corpus changes less from one Python version to the next.
SKIP_TOP = frozenset({
    "site-packages", "dist-packages", "encodings", "pydoc_data", "idlelib", "turtledemo", "lib2to3", "ensurepip",
    "__phello__", "test",
})
# Test suites inside packages (unittest/test, tkinter/test, ...): repetitive and full of deliberately odd code.
SKIP_DIRS = frozenset({"test", "tests", "idle_test"})


# ---------------------------------------------------------------------------------------------------- the corpus
def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus's `.py` files under `root` (default: the stdlib), sorted.

    Skipped: SKIP_TOP folders, `config-*` build folders, and any file inside a test-suite folder (SKIP_DIRS)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass the standard library's folder (sysconfig's 'stdlib').")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        parts = rel.parts
        if parts[0] in SKIP_TOP or parts[0].startswith("config-") or any(p in SKIP_DIRS for p in parts[:-1]):
            continue
        if path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def is_eval_file(rel_path: str) -> bool:
    """Held out for evaluation? Decided by the SHA-1 of the relative path alone, so the split is the same on every
    machine and never depends on which other files exist."""
    digest = hashlib.sha1(PurePosixPath(rel_path).as_posix().encode()).hexdigest()
    return int(digest[:8], 16) % EVAL_SHARE == 0


def split_files(files: list[str]) -> dict[str, list[str]]:
    """{"train": [...], "eval": [...]}, each sorted; disjoint, and together exactly `files`."""
    files = sorted(files)
    return {"train": [f for f in files if not is_eval_file(f)], "eval": [f for f in files if is_eval_file(f)]}


def read_source(path: str | Path) -> str | None:
    """A source file's text, decoded as Python decodes it (PEP 263 encoding line, UTF-8 by default); None if it
    cannot be decoded."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


@dataclass
class Corpus:
    """The split corpus in memory: texts by relative path, and a summary for the training log."""

    root: str
    train: dict[str, str]
    eval: dict[str, str]
    skipped: list[str]

    def summary(self) -> dict:
        def chars(d):
            return sum(len(t) for t in d.values())

        return {
            "root": self.root, "python": sys.version.split()[0], "implementation": sys.implementation.name,
            "files_train": len(self.train), "files_eval": len(self.eval),
            "files_skipped_undecodable": len(self.skipped),
            "chars_train": chars(self.train), "chars_eval": chars(self.eval),
            "eval_files": sorted(self.eval),
            "file_list_sha1": hashlib.sha1("\n".join(sorted([*self.train, *self.eval])).encode()).hexdigest(),
            "skipped_top_folders": sorted(SKIP_TOP), "skipped_folders": sorted(SKIP_DIRS),
        }


def load_corpus(root: str | Path | None = None, *, max_files: int | None = None) -> Corpus:
    """Read and split the corpus. `max_files` keeps only the first files of each split in sorted order (tiny runs)."""
    root = Path(root) if root is not None else stdlib_root()
    split = split_files(corpus_files(root))
    texts: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
    skipped = []
    for part, names in split.items():
        for name in names[:max_files] if max_files else names:
            text = read_source(root / name)
            if text is None:
                skipped.append(name)
            else:
                texts[part][name] = text
    return Corpus(str(root), texts["train"], texts["eval"], skipped)


# ---------------------------------------------------------------------------------------------------- the tokenizer
def train_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (`tokenizers`, GPT-2's pre-tokenizer) trained on `texts` (an iterable of str).

    Id 0 is EOT. Offsets are not trimmed, so each token's character span is exact (for `token_classes`).
    Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return tok


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to a checkpoint (`<folder>/tokenizer.json`, or the file itself)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the text model's folder holds tokenizer.json next to config.json.")
    return Tokenizer.from_file(str(file))


# ---------------------------------------------------------------------------------------------------- token classes
def _char_classes(text: str) -> np.ndarray:
    """uint8 `[len(text)]`: the class of every character, from Python's tokenizer. Characters between tokens are
    whitespace (if they are) or other; if `tokenize` gives up part-way (a syntax error), the rest stays so."""
    out = np.where(np.array([c.isspace() for c in text], dtype=bool), CLASS_ID["whitespace"], CLASS_ID["other"])
    out = out.astype(np.uint8)
    starts = [0]
    for line in io.StringIO(text):  # character offset of each line (tokenize counts rows from 1)
        starts.append(starts[-1] + len(line))
    kinds = {
        tokenize.NAME: None, tokenize.NUMBER: CLASS_ID["number"], tokenize.STRING: CLASS_ID["string"],
        tokenize.OP: CLASS_ID["operator"], tokenize.COMMENT: CLASS_ID["comment"],
    }
    for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python >= 3.12 splits f-strings
        if hasattr(tokenize, name):
            kinds[getattr(tokenize, name)] = CLASS_ID["string"]
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type not in kinds:
                continue  # NEWLINE, NL, INDENT, DEDENT, ENDMARKER: whitespace or nothing
            cls = kinds[t.type]
            if cls is None:
                cls = CLASS_ID["keyword"] if keyword.iskeyword(t.string) else CLASS_ID["identifier"]
            a = starts[t.start[0] - 1] + t.start[1]
            b = starts[t.end[0] - 1] + t.end[1]
            out[a:b] = cls
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        pass
    return out


def token_classes(text: str, offsets) -> np.ndarray:
    """uint8 class id (index into TOKEN_CLASSES) of each BPE token with character spans `offsets` [(a, b), ...].

    A token's class is that of its first non-space character; a token of spaces/newlines only is whitespace
    (spaces inside a string or comment belong to it); an empty span (the EOT token) is other."""
    chars = _char_classes(text)
    out = np.empty(len(offsets), dtype=np.uint8)
    for i, (a, b) in enumerate(offsets):
        if b <= a:
            out[i] = CLASS_ID["other"]
            continue
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        out[i] = chars[a + lead] if lead < len(piece) else chars[a]
    return out


def token_pieces(text: str, offsets) -> list[str]:
    """The slice of `text` each token covers, without overlaps: ''.join(pieces) == text for byte-level BPE.
    (Tokens that split one multi-byte character share its span; the first gets the character, the rest "".)"""
    pieces, end = [], 0
    for a, b in offsets:
        a, b = max(a, end), max(b, end)
        pieces.append(text[a:b])
        end = b
    return pieces


def encode_with_classes(tok, text: str) -> tuple[list[int], np.ndarray]:
    """BPE ids of `text` and the class of each token (`token_classes`)."""
    enc = tok.encode(text)
    return enc.ids, token_classes(text, enc.offsets)


# ---------------------------------------------------------------------------------------------------- streams
@dataclass
class TokenStream:
    """Files encoded and concatenated, each followed by EOT: ids `[N]` int64 (and classes `[N]` uint8 if made)."""

    ids: torch.Tensor
    classes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)


def encode_stream(tok, texts: dict[str, str], *, with_classes: bool = False) -> TokenStream:
    """Encode files (sorted by path) into one stream; EOT after each file. Classes cost a `tokenize` pass."""
    eot = tok.token_to_id(EOT)
    names = sorted(texts)
    encs = tok.encode_batch([texts[n] for n in names])
    ids, classes = [], []
    for name, enc in zip(names, encs):
        ids.extend(enc.ids)
        ids.append(eot)
        if with_classes:
            classes.append(token_classes(texts[name], enc.offsets))
            classes.append(np.array([CLASS_ID["other"]], dtype=np.uint8))
    cls = torch.from_numpy(np.concatenate(classes)).long() if with_classes else None
    return TokenStream(torch.tensor(ids, dtype=torch.long), cls)


def random_batch(stream: TokenStream, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`[batch_size, seq_len + 1]` windows of the stream at random offsets (inputs = [:, :-1], targets = [:, 1:])."""
    if len(stream) < seq_len + 2:
        raise ValueError(f"the stream has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}.")
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    return stream.ids[starts[:, None] + torch.arange(seq_len + 1)]


def eval_sequences(stream: TokenStream, seq_len: int,
                   max_sequences: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Consecutive non-overlapping windows `[n, seq_len + 1]` of the stream (and their classes), in order."""
    n = (len(stream) - 1) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the evaluation stream has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}.")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    return stream.ids[idx], (stream.classes[idx] if stream.classes is not None else None)


# ---------------------------------------------------------------------------------------------------- distances
def distance_to_previous(ids: torch.Tensor) -> torch.Tensor:
    """For every position t of each row of `ids` `[B, T]`: t - s, where s < t is the last earlier position holding
    the same token; 0 where the token has not occurred before in the row. int64 `[B, T]`.

    This is our measure of "how far back is the context a token needs": to predict a token that occurred before,
    the model can copy it from its previous occurrence. The query predicting position t sits at t - 1, and a
    window of w keys ending there reaches the previous occurrence iff the distance is <= w."""
    ids = torch.as_tensor(ids)
    B, T = ids.shape
    out = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):  # one pass per row with a dict: O(T)
        last: dict[int, int] = {}
        dist = [0] * T
        for t, x in enumerate(ids[b].tolist()):
            s = last.get(x)
            if s is not None:
                dist[t] = t - s
            last[x] = t
        out[b] = torch.tensor(dist)
    return out


def distance_buckets(window: int) -> list[tuple[int, int | None]]:
    """Inclusive distance ranges around a window of `window` keys: short (1..w/8), inside the window
    (w/8+1..w), just beyond it (w+1..4w), far (> 4w); the upper bound None = no limit."""
    short = max(1, window // 8)
    return [(1, short), (short + 1, window), (window + 1, 4 * window), (4 * window + 1, None)]


def bucket_names(window: int) -> list[str]:
    """Labels of `distance_buckets(window)` + "first occurrence" (no earlier occurrence in the context)."""
    names = [f"{a}-{b}" if b is not None else f">{a - 1}" for a, b in distance_buckets(window)]
    return names + ["first occurrence"]


def distance_bucket(dist: torch.Tensor, window: int) -> torch.Tensor:
    """Bucket index (into `bucket_names(window)`) of each distance (0 = first occurrence, the last bucket)."""
    buckets = distance_buckets(window)
    out = torch.full_like(dist, len(buckets))
    for i, (a, b) in enumerate(buckets):
        out[(dist >= a) & ((dist <= b) if b is not None else (dist >= a))] = i
    return out
