"""Stand-in of `backend/patcher` (forge)."""
