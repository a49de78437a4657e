"""FedREX entry points: run configurations, the `fedrex` CLI, simulation and deployment."""
