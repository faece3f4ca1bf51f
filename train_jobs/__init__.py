"""Training on the SolanaLM network.

Ray Train data-parallel fine-tuning (`data_parallel`), Flower federated rounds with DP-SGD and
per-round client rewards (`federated`, `fl_client`, `fl_server`), the pure training code they share
(`task`, `data`, `privacy`), and train -> serve export (`export`). See docs/training.md.
"""
