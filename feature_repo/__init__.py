"""The Feast feature repository of StreamFlow (both profiles share these definitions)."""
