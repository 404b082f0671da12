"""Stand-in of `backend/sampling` (neo)."""
