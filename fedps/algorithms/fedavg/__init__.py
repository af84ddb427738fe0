"""FedAvg: horizontal federated learning with secure aggregation."""
