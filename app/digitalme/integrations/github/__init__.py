"""GitHub: events recorded as the owner's activity; mentions of the clone answered."""
