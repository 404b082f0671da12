"""Stand-in of the forge frontend's `backend` package (tests only; see the modules inside)."""
