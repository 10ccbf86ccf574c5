"""T5-style tokenizers: the real FlanT5 one for the official model, a small word-level one otherwise.

The small tokenizer is trained on the fly with `tokenizers` from the vocabulary and any captions given.
It keeps T5's special ids (pad=0, eos=1, unk=2), lower-cases, splits on whitespace and punctuation
(so a control string "man,white shirt|" becomes `man , white shirt | </s>`), appends </s>, and saves
and loads with `save_pretrained` / `AutoTokenizer.from_pretrained` like any Hugging Face tokenizer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5

# Frequent caption words, so that a tokenizer built from a tag vocabulary alone can still write sentences.
BASIC_WORDS = """a an the this that these those some many two three four one of on in at with and or
to from by for near next behind above below under over front back top bottom left right side middle
is are was has have his her its their it he she they who which while
man woman person people boy girl child dog cat car tree sky building street water grass white black
red blue green yellow brown gray orange pink purple large small big little tall short long young old
sitting standing walking holding wearing looking riding playing parked hanging lying""".split()


def build_word_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 512
                         ) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `texts` (plus BASIC_WORDS) with at most `vocab_size` entries."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for words")
    tokenizer = Tokenizer(WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    trainer = WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    # "," and "|" build every control string; keep them (and "." for captions) whatever the corpus.
    corpus = list(texts) + [" ".join(BASIC_WORDS) + " , | ."]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)
    ids = [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special token ids came out as {ids}, expected [0, 1, 2]")
    return fast


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer folder (T5TokenizerFast, CLIPTokenizerFast or our word-level one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder))


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:|'])")


def clean_decoded(text: str) -> str:
    """Undo the word-level decoder's spaces before punctuation ("a man , sitting" -> "a man, sitting")."""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()
