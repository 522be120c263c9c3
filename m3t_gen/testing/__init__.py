"""Test scaffolding the small-shard mode also uses: tiny random-weight models built locally."""
