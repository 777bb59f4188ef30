"""A Hugging Face tokenizer for the synthetic task (``dsmoe.data``): a ``tokenizers`` word-level vocabulary
whose ids are the task's, so that ``dsmoe train`` checkpoints load with ``AutoTokenizer`` and serve text.

Words: ``<s>`` (BOS), ``</s>`` (EOS), ``|`` (SEP), then the symbols ``0 .. S-1``, separated by spaces,
as ``PermutedCopyTask.decode`` prints them. Written with ``tokenizers`` alone (``tokenizer.json`` plus a
``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``); :func:`load_tokenizer` reads it back with
``transformers.AutoTokenizer`` when transformers is installed, else through ``tokenizers`` directly."""
from __future__ import annotations

import json
import os

__all__ = ["task_tokenizer", "save_task_tokenizer", "load_tokenizer"]

_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _backend(task):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from .data import BOS, EOS, SEP, _FIRST

    vocab = {"<s>": BOS, "</s>": EOS, "|": SEP, "<unk>": _FIRST + task.num_symbols}
    vocab.update({str(i): _FIRST + i for i in range(task.num_symbols)})
    # NOTE: <unk> takes the id after the symbols, outside the model's vocabulary: an unknown word is
    # then an out-of-range id, which the engine rejects by name instead of reading it as a symbol
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with single spaces
    tok.add_special_tokens(list(_SPECIAL.values()))
    return tok


def save_task_tokenizer(task, path) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``path``."""
    os.makedirs(path, exist_ok=True)
    _backend(task).save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": 1 << 30, **_SPECIAL}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(_SPECIAL, f, indent=2)


def task_tokenizer(task):
    """The task's tokenizer as ``PreTrainedTokenizerFast`` (needs transformers)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_backend(task), clean_up_tokenization_spaces=False, **_SPECIAL)


class _Tokenizers:
    """The two calls the engine makes, over a bare ``tokenizers.Tokenizer`` (no transformers installed)."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg = {}
        p = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(p):
            with open(p) as f:
                cfg = json.load(f)
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None

    def encode(self, text, add_special_tokens=False):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path):
    """A checkpoint folder's tokenizer: ``AutoTokenizer`` when transformers is installed, else the
    ``tokenizer.json`` through ``tokenizers``; None when the folder has no tokenizer files."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return _Tokenizers(path)
    return AutoTokenizer.from_pretrained(path)
