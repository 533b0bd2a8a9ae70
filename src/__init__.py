"""lic-lab: train, entropy-code and evaluate learned image codecs."""
