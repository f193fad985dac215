"""Batch jobs over every user of a snapshot: `streamflow score-all`."""
