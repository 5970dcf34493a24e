"""Image-caption sources, their decoding and bad samples, the loader."""
