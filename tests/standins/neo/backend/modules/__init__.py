"""Stand-in of `backend/modules` (neo)."""
