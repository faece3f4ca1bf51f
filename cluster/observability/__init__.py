"""Operations support shared by every SolanaLM package: metric definitions, JSON logs, Grafana provisioning."""
