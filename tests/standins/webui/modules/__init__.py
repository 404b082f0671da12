"""Stand-in of the A1111 / Forge ``modules`` package: only what an extension script uses
(tests only; each module names the real file it stands in for)."""
