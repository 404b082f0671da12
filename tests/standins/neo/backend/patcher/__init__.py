"""Stand-in of `backend/patcher` (neo)."""
