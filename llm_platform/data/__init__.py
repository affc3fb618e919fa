"""The data stage: read, clean, deduplicate, split, tokenize and pack a corpus into a dataset folder."""
