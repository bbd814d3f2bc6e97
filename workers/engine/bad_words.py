"""vLLM's `bad_words`: words a request may not generate, as token sequences.

A word is banned as it tokenizes at the start of a text and after a space (in the middle of
one), so both token sequences count. The sampler masks a sequence's last token wherever the
output so far ends with the ones before it (a one-token word: always).
"""


def bad_word_token_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """The distinct token sequences of `words`, each without and with a leading space."""
    banned: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in banned:
                banned.append(ids)
    return tuple(banned)
