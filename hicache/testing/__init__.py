"""The conformance kit every backend runs (see ``hicache.testing.kit``)."""
