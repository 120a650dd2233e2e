"""Dataset layer: spec readers, the normalised split form, the built-in city, image datasets."""
