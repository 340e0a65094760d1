"""Data layer: procedural tasks, corpora, tokenizer, token shards and the packed loader."""
