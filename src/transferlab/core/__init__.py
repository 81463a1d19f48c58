"""The foundation every layer may use: errors, file safety (atomic writes, locks, digests), value checks,
the console, provenance. Imports nothing of transferlab's."""
