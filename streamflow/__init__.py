"""StreamFlow Serving: shared settings and the `streamflow` command."""
