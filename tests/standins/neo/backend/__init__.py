"""Stand-in of the neo frontend's `backend` package (tests only; see the modules inside)."""
