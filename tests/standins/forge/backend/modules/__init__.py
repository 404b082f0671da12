"""Stand-in of `backend/modules` (forge)."""
