"""Agent programs the producer tests run as real processes, and the helpers to drive them."""
