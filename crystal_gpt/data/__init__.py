"""Data and codec: Wyckoff tables, the canonical Wyckoff form (encode/decode), dataset files,
the encoded-dataset cache and batching."""
