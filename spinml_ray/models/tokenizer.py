"""The real CLIP BPE tokenizer, built offline from the vocabulary that open-clip-torch ships.

CLIP's tokenizer is fully determined by its BPE merge list: the vocabulary is the 256 byte symbols,
the same with an end-of-word marker, one entry per merge, and the two special tokens (49,408 in all).
We write that as the `vocab.json` + `merges.txt` pair that transformers' CLIPTokenizer loads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

N_MERGES = 49152 - 256 - 2  # the merges CLIP uses from the shipped list
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def shipped_bpe_path() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; it ships the CLIP BPE vocabulary")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"{path}: CLIP BPE vocabulary missing from open-clip-torch")
    return path


def write_clip_tokenizer(out_dir: str, max_length: int = 77) -> str:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIPTokenizer into out_dir."""
    with gzip.open(shipped_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(vocab)}, handle, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return out_dir
