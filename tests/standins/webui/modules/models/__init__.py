"""Stand-in package (A1111 `modules/models`)."""
