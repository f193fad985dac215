"""StreamFlow Serving test suite."""
