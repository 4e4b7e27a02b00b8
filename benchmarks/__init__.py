"""asv benchmark suite (asv.conf.json, docs/asv.md): one module per area, shared code in _common."""
