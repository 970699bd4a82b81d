"""The GPT-NeoX tokenizer of the Mamba-2 checkpoints, read from tokenizer.json with the `tokenizers`
library (no transformers needed). state-spaces/mamba2-* repos ship without one: copy
EleutherAI/gpt-neox-20b's tokenizer.json into the checkpoint directory."""

import os
import sys

__all__ = ["Tokenizer", "TextStreamer", "byte_tokenizer"]


class Tokenizer:
    def __init__(self, tok, eos_token="<|endoftext|>"):
        self.tok = tok
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token is not None else None

    @classmethod
    def from_pretrained(cls, path, eos_token="<|endoftext|>"):
        """From `path`/tokenizer.json (or a tokenizer.json file path)."""
        from tokenizers import Tokenizer as _Tok
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"Tokenizer.from_pretrained: no tokenizer.json at {file}; "
                                    f"state-spaces checkpoints ship without one: copy the GPT-NeoX "
                                    f"(EleutherAI/gpt-neox-20b) tokenizer.json there")
        return cls(_Tok.from_file(file), eos_token)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=False):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens=True):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class TextStreamer:
    """A generate() callback that prints row `row`'s text as it is produced. Text is emitted only
    once it no longer ends in an incomplete UTF-8 sequence (shown as U+FFFD while partial)."""

    def __init__(self, tokenizer, row=0, file=None):
        self.tokenizer = tokenizer
        self.row = row
        self.file = file or sys.stdout
        self.ids = []
        self.printed = 0

    def __call__(self, tokens):
        self.ids.append(int(tokens[self.row]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.file.write(text[self.printed:])
        self.file.flush()
        self.printed = len(text)
        if text.endswith("\n"):  # start afresh after a line: keeps each decode short
            self.done_text = getattr(self, "done_text", "") + text
            self.ids, self.printed = [], 0

    def end(self):
        """After generation: print what was held back (a trailing partial UTF-8 sequence shows
        as U+FFFD, as decode() of the whole answer has it)."""
        text = self.tokenizer.decode(self.ids)
        self.file.write(text[self.printed:])
        self.file.flush()
        self.printed = len(text)

    def text(self):
        return getattr(self, "done_text", "") + self.tokenizer.decode(self.ids)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: <|endoftext|> = 0, then the 256 bytes. For
    tests, benchmarks and random-weight models, where the text carries no meaning."""
    from tokenizers import Tokenizer as _Tok, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {"<|endoftext|>": 0}
    for i, ch in enumerate(sorted(ByteLevel.alphabet())):
        vocab[ch] = i + 1
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(tok)
