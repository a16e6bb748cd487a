"""Quality benchmark: MiniLM on Rotten Tomatoes, every method at equal budget."""
