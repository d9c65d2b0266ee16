"""The embedded toy world: a verifiable task, a trained teacher and a warm-started student."""
