"""Data: superpixels, patch labels and the built-in demo scenes."""
