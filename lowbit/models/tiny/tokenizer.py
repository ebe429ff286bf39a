"""The embedded tiny model's tokenizer: a byte-level BPE with single-digit tokens, and EOS-joined tokenisation."""

from __future__ import annotations


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")


def concat_with_eos(tok, docs: list[str]) -> list[int]:
    """Token ids of ``docs``, each followed by EOS, concatenated."""
    ids: list[int] = []
    for e in tok(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(e)
        ids.append(tok.eos_token_id)
    return ids
