"""Train a Llama-style SentencePiece BPE tokenizer offline and save it as a Hugging Face folder.

The folder holds ``tokenizer.model`` (SentencePiece, for ``LlamaTokenizer``) and
``tokenizer.json`` (for ``LlamaTokenizerFast`` / ``AutoTokenizer`` and, through
``backend_tokenizer``, the torch-free runtime), plus the usual config files.

Special ids follow Llama: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, no pad. Byte fallback covers
any character outside the corpus. The vocabulary has exactly ``vocab_size`` pieces: when the
corpus supports fewer natural BPE pieces (e.g. 32000 for MobileLLaMA-shaped presets on the
small ShapesVQA corpus), the rest are ``<unused{i}>`` user-defined pieces appended at the end,
which only ever match that literal text. Training is single-threaded and deterministic: the same
inputs give a byte-identical ``tokenizer.model``.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Sequence

from edgevlm.runtime.errors import EdgeVLMError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
UNUSED = "<unused{}>"
MIN_VOCAB = 3 + 256
DEFAULT_CORPUS_ITEMS = 1500  # ShapesVQA items for default_tokenizer; a few seconds even at 32000

_SPM_ARGS = dict(
    model_type="bpe",
    byte_fallback=True,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
    unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
    normalization_rule_name="identity",  # Llama: no NFKC, keep whitespace as is
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.99995,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,  # use every sentence: no sampling
    hard_vocab_limit=False,  # stop early when the corpus runs out of merges; padded below
    minloglevel=2,
)


def _train_proto(corpus: Sequence[str], vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)  # nothing is sampled with these settings; belt and braces
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf,
                                       vocab_size=vocab_size, **_SPM_ARGS)
    except RuntimeError as e:
        raise EdgeVLMError(f"tokenizer training failed for vocab_size={vocab_size} "
                           f"({len(corpus)} texts): {e}. The vocabulary must hold 3 special "
                           "tokens, 256 byte pieces and every character of the corpus.") from None
    return buf.getvalue()


def _pad_proto(proto: bytes, vocab_size: int) -> bytes:
    """Append ``<unused{i}>`` user-defined pieces until the vocabulary has vocab_size pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(proto)
    have = len(model.pieces)
    if have > vocab_size:
        raise EdgeVLMError(f"tokenizer came out with {have} pieces, more than vocab_size="
                           f"{vocab_size}")
    for i in range(vocab_size - have):
        piece = model.pieces.add()
        piece.piece = UNUSED.format(i)
        piece.score = 0.0
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    return model.SerializeToString()


def _save_hf(model_path: str, out_dir: str) -> None:
    from transformers import LlamaTokenizerFast

    # add_prefix_space=True makes tokenizer.json prepend "▁" to the first word, as the slow
    # tokenizer and SentencePiece do. It is left out of tokenizer_config.json: there it would
    # make every LlamaTokenizerFast load re-convert from tokenizer.model (slow, needs
    # sentencepiece), and the slow tokenizer's default is already True.
    fast = LlamaTokenizerFast(vocab_file=model_path, from_slow=True, legacy=False,
                              add_prefix_space=True, add_bos_token=True, add_eos_token=False,
                              unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=None,
                              clean_up_tokenization_spaces=False)
    fast.init_kwargs.pop("add_prefix_space", None)
    fast.init_kwargs.pop("from_slow", None)
    fast.save_pretrained(out_dir)


def build_tokenizer(out_dir: str, corpus: Sequence[str], vocab_size: int, seed: int = 0) -> str:
    """Train on ``corpus`` and write a HF Llama tokenizer folder to ``out_dir``; returns out_dir.

    Files are built in a temporary folder inside ``out_dir`` and moved into place at the end.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise EdgeVLMError(f"vocab_size must be an integer > {MIN_VOCAB} (3 special tokens, 256 "
                           f"byte pieces and the corpus characters), got {vocab_size!r}")
    texts = [t for t in corpus if t and t.strip()]
    if not texts:
        raise EdgeVLMError("tokenizer corpus is empty")
    proto = _pad_proto(_train_proto(texts, vocab_size, seed), vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir)
    try:
        model_path = os.path.join(tmp, "tokenizer.model")
        with open(model_path, "wb") as f:
            f.write(proto)
        _save_hf(model_path, tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_tokenizer(out_dir: str, vocab_size: int, seed: int = 0) -> str:
    """The tokenizer for presets with random weights: ``build_tokenizer`` on ShapesVQA texts.

    The same (vocab_size, seed) always gives the same files.
    """
    from edgevlm.train.data.shapes import shapes_text_corpus

    corpus = shapes_text_corpus(n=DEFAULT_CORPUS_ITEMS, seed=seed)
    return build_tokenizer(out_dir, corpus, vocab_size, seed=seed)
