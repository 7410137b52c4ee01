"""Route matching and the stream registry (pure core)."""
