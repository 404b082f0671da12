"""Stand-in of `backend/sampling` (forge)."""
