"""SecureBoost: vertical gradient-boosted trees (guest holds labels, hosts hold features)."""
