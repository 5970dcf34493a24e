"""What is built on a trained run: search and its server, export, analysis, embeddings."""
