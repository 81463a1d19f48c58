"""The console scripts (transferlab, -eval, -report, -rank) and what they share: user-error handling, the config
resolvers, the fast exit. Imports every other layer; nothing imports it."""
