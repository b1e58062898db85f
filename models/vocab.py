"""A language model's vocabulary: characters (a string) or tokens (a list of strings). Torch-free.

One object turns text into token ids and back, for training, export and serving alike. A character
vocabulary is a string whose i-th character is token i. A token vocabulary is a list whose i-th entry is
token i; text is cut into tokens by greedy longest match (so a vocabulary of words plus " " works, and so
does one of sub-word pieces), or, with a ``separator`` (e.g. " "), split on it and each piece looked up.
Decoding joins the tokens (with the separator, if any).
"""

from __future__ import annotations

from collections import Counter


class VocabularyError(ValueError):
    """A vocabulary that cannot work (duplicates, empty tokens), or text it cannot encode."""


class Vocabulary:
    def __init__(self, tokens: str | list[str], separator: str = "") -> None:
        if isinstance(tokens, str):
            tokens = list(tokens)
        elif not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise VocabularyError("vocab must be a string (one token per character) or a list of strings")
        if not tokens:
            raise VocabularyError("vocab is empty")
        duplicates = [t for t, n in Counter(tokens).items() if n > 1]
        if duplicates:
            raise VocabularyError(f"vocab has {len(duplicates)} duplicate token(s), e.g. {duplicates[:5]}: "
                                  "token i must be the only entry i (remove the repeats)")
        if "" in tokens:
            raise VocabularyError(f"vocab entry {tokens.index('')} is the empty string: every token needs text")
        self.tokens, self.separator = tokens, separator
        self.index = {t: i for i, t in enumerate(tokens)}
        self.is_chars = all(len(t) == 1 for t in tokens) and not separator
        self._longest = max(len(t) for t in tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def unknown(self, text: str) -> list[str]:
        """The pieces of ``text`` that no token covers (empty when it encodes)."""
        try:
            self.encode(text)
        except VocabularyError as e:
            return e.args[1] if len(e.args) > 1 else [text]
        return []

    def encode(self, text: str) -> list[int]:
        if self.is_chars:
            missing = sorted({ch for ch in text if ch not in self.index})
            if missing:
                raise VocabularyError(f"{len(missing)} character(s) outside the vocabulary: {missing[:10]}", missing)
            return [self.index[ch] for ch in text]
        if self.separator:
            # A whitespace separator splits on any whitespace (line breaks in a text file included).
            pieces = text.split() if self.separator.isspace() else [p for p in text.split(self.separator) if p]
            missing = sorted({p for p in pieces if p not in self.index})
            if missing:
                raise VocabularyError(f"{len(missing)} token(s) outside the vocabulary: {missing[:10]}", missing)
            return [self.index[p] for p in pieces]
        ids, i, missing = [], 0, []
        while i < len(text):  # greedy longest match
            for size in range(min(self._longest, len(text) - i), 0, -1):
                if text[i:i + size] in self.index:
                    ids.append(self.index[text[i:i + size]])
                    i += size
                    break
            else:
                missing.append(text[i])
                i += 1
        if missing:
            missing = sorted(set(missing))
            raise VocabularyError(f"{len(missing)} character(s) no token covers: {missing[:10]}", missing)
        return ids

    def piece(self, token: int) -> str:
        """What appending ``token`` to text adds (with the separator, if any)."""
        return self.separator + self.tokens[token]

    def decode(self, ids: list[int]) -> str:
        return self.separator.join(self.tokens[i] for i in ids)

    def describe(self) -> dict:
        """The vocabulary as a client needs it to tokenize without our code (GET /models, v2 metadata)."""
        return {"size": len(self), "type": "characters" if self.is_chars else "tokens",
                "tokens": "".join(self.tokens) if self.is_chars else self.tokens,
                **({"separator": self.separator} if self.separator else {})}
