"""Layer plans and producers (generic, linux, illumos)."""
