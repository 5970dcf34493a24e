"""What a trained run's embeddings keep: linear CKA between them, linear probes of them."""
