"""The Flower App bundle of SolanaLM's federated job (see train_jobs.fl_deploy)."""
