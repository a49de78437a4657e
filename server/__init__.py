"""FedREX ServerApp, strategies and metric aggregation."""
