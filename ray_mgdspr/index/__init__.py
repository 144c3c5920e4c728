"""Index stage: sharded Faiss indexes of the catalogue embeddings, versioned with the model bundle.

``manifest`` describes a version, ``shards`` builds and verifies versions (Ray-free: one call per
shard), ``search`` loads shards and answers top-k queries (faiss-cpu, faiss-gpu or torch exact).
"""
