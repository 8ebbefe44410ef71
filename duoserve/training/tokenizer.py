"""Byte-level BPE tokenizer trained with ``tokenizers``, saved as Hugging Face files.

Files written next to a checkpoint (``save_tokenizer_files``): ``tokenizer.json``,
``tokenizer_config.json`` (eos, pad and a jinja chat template) and nothing else; the
``generation_config.json`` is written by the checkpoint exporter.

CLI (used by scripts/build_corpus.sh): trains the tokenizer on the corpus' train split and
writes ``tokenizer/`` plus ``{train,heldout}.tokens.npy`` (uint16 ids, every document
followed by the eos id) into the corpus folder.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from duoserve.training.corpus import EOS_TOKEN, SPECIAL_TOKENS, read_documents

# Renders {"role", "content"} messages as "<|role|>\ncontent<|endoftext|>\n"; the
# generation prompt opens the assistant turn. The model stops on <|endoftext|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with the chat/eos special tokens at ids 0..3."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tokenizer.token_to_id(EOS_TOKEN) == 0, "eos must be id 0"
    return tokenizer


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-text token."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    assert token_id is not None, f"tokenizer has no {EOS_TOKEN}"
    return token_id


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, max_length_tokens: int) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length_tokens,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Concatenated ids of all texts, each followed by eos, as uint16 ``[N]``."""
    assert tokenizer.get_vocab_size() <= 65536, "uint16 ids need vocab <= 65536"
    eos = eos_token_id(tokenizer)
    pieces = []
    for encoding in tokenizer.encode_batch(list(texts)):
        pieces.append(np.asarray(encoding.ids, dtype=np.uint16))
        pieces.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def build_corpus_tokens(corpus_dir: Path, vocab_size: int) -> dict[str, int]:
    """Train the tokenizer on the train split (chat examples excluded) and encode both splits."""
    train_docs = read_documents(corpus_dir, "train")
    plain_texts = [text for doc_id, text in train_docs if "#chat" not in doc_id]
    tokenizer = train_tokenizer(plain_texts, vocab_size)
    save_tokenizer_files(tokenizer, corpus_dir / "tokenizer", max_length_tokens=2048)
    counts = {}
    for split, docs in (("train", train_docs), ("heldout", read_documents(corpus_dir, "heldout"))):
        ids = encode_documents(tokenizer, [text for _, text in docs])
        np.save(corpus_dir / f"{split}.tokens.npy", ids, allow_pickle=False)
        counts[f"{split}_tokens"] = int(ids.size)
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    meta.update(counts, vocab_size=tokenizer.get_vocab_size())
    (corpus_dir / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def load_corpus_tokens(corpus_dir: Path, split: str) -> np.ndarray:
    """uint16 ids of one split written by ``build_corpus_tokens`` (never unpickles)."""
    return np.load(corpus_dir / f"{split}.tokens.npy", allow_pickle=False)


def main() -> None:
    """CLI: ``python -m duoserve.training.tokenizer --corpus DIR [--vocab-size N]``."""
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer and encode the corpus.")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    print(json.dumps(build_corpus_tokens(args.corpus, args.vocab_size)))


if __name__ == "__main__":
    main()
