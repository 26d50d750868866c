"""Load tests and comparisons, run against servers over HTTP. Never imports `server`."""
