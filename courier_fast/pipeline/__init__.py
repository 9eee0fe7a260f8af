"""The application around a trained encoder: encode items, write the embedding table (vector,
cluster ID), catalogue-scale embedding, downstream CTR evaluation, and the demo."""
