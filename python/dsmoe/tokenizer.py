"""A Hugging Face tokenizer for the synthetic task (``dsmoe.data``): a ``tokenizers`` word-level vocabulary
whose ids are the task's, so that ``dsmoe train`` checkpoints load with ``AutoTokenizer`` and serve text.

Words: ``<s>`` (BOS), ``</s>`` (EOS), ``|`` (SEP), then the symbols ``0 .. S-1``, separated by spaces,
as ``PermutedCopyTask.decode`` prints them."""
from __future__ import annotations

__all__ = ["task_tokenizer", "save_task_tokenizer"]


def task_tokenizer(task):
    """``PreTrainedTokenizerFast`` for ``task`` (a ``PermutedCopyTask``); ``decode(task ids)`` equals
    ``task.decode`` up to the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .data import BOS, EOS, SEP, _FIRST

    vocab = {"<s>": BOS, "</s>": EOS, "|": SEP, "<unk>": _FIRST + task.num_symbols}
    vocab.update({str(i): _FIRST + i for i in range(task.num_symbols)})
    # NOTE: <unk> takes the id after the symbols, outside the model's vocabulary: an unknown word is
    # then an out-of-range id, which the model rejects by name instead of reading it as a symbol
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def save_task_tokenizer(task, path) -> None:
    """Writes ``tokenizer.json`` and its config into ``path`` (a checkpoint folder)."""
    task_tokenizer(task).save_pretrained(path)
