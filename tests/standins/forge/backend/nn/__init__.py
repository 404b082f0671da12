"""Stand-in of `backend/nn` (forge): model classes with the real names, signatures and block lists."""
