"""A tiny Hugging Face checkpoint, built on this machine, for a dry run of the transformer recipes without a network::

    python -m lightning_adalabel.examples.recipes.tiny_checkpoint tiny_bert
    adalabel fit --config agnews_bert --data.root data/ag_news_csv --model.checkpoint tiny_bert \\
        --trainer.fast_dev_run 2 --data.batch_size 4

It writes into one folder, with ``save_pretrained``, a randomly initialised BERT encoder (2 layers, hidden size 32,
512 positions) and a cased character-level WordPiece tokenizer (every printable ASCII character, as a word start and
as a continuation), both made with ``transformers`` and ``tokenizers`` alone: nothing is downloaded. The recipes
(``agnews_bert``, ``yahoo_bert``, ``yelp_full_bert``, ``conll2003``) load it as any checkpoint folder. It learns
nothing worth keeping; it shows that the data, the recipe and the machine work before a real checkpoint is
downloaded.
"""

import argparse
import string
import sys
from pathlib import Path
from typing import List, Optional, Sequence

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "max_position_embeddings": 512}


def character_vocabulary() -> List[str]:
    """The special tokens, then each printable ASCII character as a word start and as a continuation (``##a``): a
    WordPiece tokenizer over it encodes any ASCII text without ``[UNK]`` (other characters become ``[UNK]``).

    Example:
        >>> vocabulary = character_vocabulary()
        >>> vocabulary[:6], "##Z" in vocabulary, len(vocabulary)
        (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '0'], True, 193)
    """
    characters = [c for c in string.printable if not c.isspace()]
    return SPECIAL_TOKENS + characters + [f"##{c}" for c in characters]


def wordpiece_tokenizer(
    vocabulary: List[str], lowercase: bool, model_max_length: int = CONFIG["max_position_embeddings"]
) -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """A BERT-style WordPiece tokenizer over ``vocabulary`` (which starts with the special tokens), built locally
    with ``tokenizers`` (the same code for transformers 4.x and 5.x); ``lowercase`` as an uncased BERT (which also
    strips accents), else cased."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {token: index for index, token in enumerate(dict.fromkeys(SPECIAL_TOKENS + vocabulary))}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write the tiny BERT encoder and its tokenizer into ``folder`` (created if needed); return ``folder``."""
    import torch
    import transformers

    tokenizer = wordpiece_tokenizer(character_vocabulary(), lowercase=False)  # cased: the NER recipe needs case
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer), **CONFIG))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_adalabel.examples.recipes.tiny_checkpoint", description=__doc__.split("\n")[0],
        epilog="then: adalabel fit --config agnews_bert --data.root DATA --model.checkpoint FOLDER"
               " --trainer.fast_dev_run 2 --data.batch_size 4",
    )
    parser.add_argument("folder", help="where to write the checkpoint (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        parser.error('needs Hugging Face transformers and tokenizers: pip install "lightning-adalabel[transformers]"')
    folder = write_tiny_checkpoint(Path(args.folder), args.seed)
    print(f"wrote a 2-layer BERT encoder and a character tokenizer to {folder}; pass --model.checkpoint {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
