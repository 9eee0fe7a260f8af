"""The self-check: every kernel backend against the float64 reference on the user's own device,
before backend="auto" uses it. Importing it installs it as the registry's validator."""
