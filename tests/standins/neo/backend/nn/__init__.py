"""Stand-in of `backend/nn` (neo): model classes with the real names, signatures and block lists."""
