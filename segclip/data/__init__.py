"""Data: superpixels and patch labels, shards, the training loader and the built-in demo scenes."""
