"""Private engine pieces of :mod:`voicepool.pool`. Nothing here is public API."""
