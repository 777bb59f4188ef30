"""Reference mla ops (filled in by its issue)."""
__all__: list = []
